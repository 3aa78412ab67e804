//! # vr-bench
//!
//! The whole pipeline as a player sees it (benchmark, not a test; figures in
//! docs/BENCHMARKS.md). It starts, as separate processes, a private nats-server, the Discord
//! simulator and the release binaries of gateway-listener, room-manager and one or more edges;
//! logs players in through the edges' OAuth login against the simulator; has room-manager create
//! the rooms and the players join them; opens WebSocket clients that subscribe to their rooms;
//! then makes voice changes **at the simulator** (its control API) at a fixed rate and measures,
//! per change and per client, the time from just before the change request to the client's read.
//!
//! ```text
//! cargo build --release -p vr-bench -p discord-sim -p gateway-listener -p room-manager -p edge --bins
//! target/release/vr-bench --players 100 --rooms 2500 --clients 10000 --rate 1000 --seconds 20
//! target/release/vr-bench --edges 6 --clients 30000 ...        # several edges behind one NATS
//! target/release/vr-bench --env edge:TOKIO_WORKER_THREADS=1 ... # a lever, per process
//! target/release/vr-bench --edge-bin /path/to/previous/edge ...  # side by side
//! ```
//!
//! ## Layout
//! - [`Stack`]: the processes (binaries from `--bin-dir`, default: next to this one).
//! - world set-up: guilds (200 rooms each: a guild holds 250 roles), players, one voice actor
//!   per room (a user with the room's role, sitting in its voice channel).
//! - load: change *k* of room *r* sets the actor's flags to the 4 bits of *k* (self mute,
//!   self video, self stream, server mute), so every frame names the change it carries; a room's
//!   next change is requested only after the simulator answered its previous one (order is
//!   kept at the source, so any reordering seen is the pipeline's).
//! - per hop (means): request → gateway receipt (`received_at`, a millisecond wall clock),
//!   request → stored and republished (`live.rooms.>` read by this process, monotonic),
//!   gateway receipt → edge frame (`ts`, ms clock), request → client read (monotonic).
//! - CPU per process from `/proc/<pid>/stat` over the load phase.
//!
//! The machine's load is everyone's: the generator, NATS and every service share its cores,
//! which is what the figures measure.

// A benchmark driver: a panic (unwrap, expect, an index or an overflow) is a failed run.
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
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use voicerooms_contract::command::{decode_reply, CreateRoom, Created, JoinRoom, Joined};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::{GuildId, UserId, UserRef};
use voicerooms_testkit::{free_port, wait_until, NatsServer, ServiceProcess};

const SESSION_KEY: &str = "vr-bench-session-key-0123456789abcdef0123456789";
const INVITE_SECRET: &str = "vr-bench-invite-secret-0123456789abcdef";
const SIM_CLIENT_ID: &str = "100000000000000001";
const SIM_CLIENT_SECRET: &str = "sim-client-secret";
const SIM_BOT_TOKEN: &str = "sim-bot-token";
/// Rooms per guild: each room is a role, and a guild holds at most 250 roles.
const ROOMS_PER_GUILD: usize = 200;

struct Args {
    players: usize,
    rooms: usize,
    clients: usize,
    rate: u64,
    seconds: u64,
    edges: usize,
    bin_dir: Option<PathBuf>,
    /// Another edge binary (e.g. the previous build's, for side-by-side runs).
    edge_bin: Option<String>,
    /// (process, key, value): extra environment for one kind of process.
    env: Vec<(String, String, String)>,
    threads: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: vr-bench [--players N] [--rooms N] [--clients N] [--rate CHANGES/S] [--seconds S] \
         [--edges N] [--bin-dir DIR] [--edge-bin PATH] [--threads N] [--env PROCESS:KEY=VALUE]...\n\
         PROCESS: discord-sim, gateway-listener, room-manager, edge"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        players: 100,
        rooms: 2500,
        clients: 10_000,
        rate: 1000,
        seconds: 20,
        edges: 1,
        bin_dir: None,
        edge_bin: None,
        env: Vec::new(),
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        let n = || value.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--players" => args.players = n() as usize,
            "--rooms" => args.rooms = n() as usize,
            "--clients" => args.clients = n() as usize,
            "--rate" => args.rate = n(),
            "--seconds" => args.seconds = n(),
            "--edges" => args.edges = n() as usize,
            "--threads" => args.threads = n() as usize,
            "--bin-dir" => args.bin_dir = Some(PathBuf::from(&value)),
            "--edge-bin" => args.edge_bin = Some(value.clone()),
            "--env" => {
                let (process, kv) = value.split_once(':').unwrap_or_else(|| usage());
                let (k, v) = kv.split_once('=').unwrap_or_else(|| usage());
                args.env.push((process.into(), k.into(), v.into()));
            }
            _ => usage(),
        }
    }
    if args.players < 2
        || args.rooms == 0
        || args.edges == 0
        || args.rate == 0
        || args.clients < args.rooms
        || args.rooms > 100 * args.players
    {
        eprintln!(
            "need players ≥ 2, rooms ≥ 1 and ≤ 100 per player, edges ≥ 1, rate ≥ 1, clients ≥ rooms"
        );
        usage();
    }
    args
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// CPU seconds (user + system) of a process from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// The pid of the nats-server listening on `port` (the testkit does not expose it).
fn nats_pid(port: u16) -> Option<u32> {
    let port = port.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_nats = args.first().is_some_and(|a| a.ends_with(b"nats-server"));
        let on_port = args
            .windows(2)
            .any(|w| w[0] == b"-p" && w[1] == port.as_bytes());
        (is_nats && on_port).then_some(pid)
    })
}

/// The processes of one run.
struct Stack {
    nats: NatsServer,
    sim: ServiceProcess,
    sim_base: String,
    gateway: ServiceProcess,
    manager: ServiceProcess,
    edges: Vec<(ServiceProcess, u16)>,
}

impl Stack {
    /// (name, pid) of every process, this one included.
    fn pids(&self) -> Vec<(String, u32)> {
        let mut out = vec![
            (
                "nats-server".to_owned(),
                nats_pid(self.nats.port()).unwrap_or(0),
            ),
            ("discord-sim".to_owned(), self.sim.pid()),
            ("gateway-listener".to_owned(), self.gateway.pid()),
            ("room-manager".to_owned(), self.manager.pid()),
        ];
        for (i, (edge, _)) in self.edges.iter().enumerate() {
            out.push((format!("edge-{i}"), edge.pid()));
        }
        out.push(("vr-bench".to_owned(), std::process::id()));
        out
    }
}

fn bin(args: &Args, name: &str) -> String {
    if let (Some(edge), "edge") = (&args.edge_bin, name) {
        return edge.clone();
    }
    let dir = args.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .parent()
            .expect("own directory")
            .to_path_buf()
    });
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: cargo build --release -p {name} --bins",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

fn with_extra(
    args: &Args,
    process: &str,
    mut env: Vec<(&'static str, String)>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env.drain(..).map(|(k, v)| (k.to_owned(), v)).collect();
    for (p, k, v) in &args.env {
        if p == process {
            out.retain(|(key, _)| key != k);
            out.push((k.clone(), v.clone()));
        }
    }
    out
}

fn spawn(args: &Args, name: &str, env: Vec<(String, String)>) -> ServiceProcess {
    let refs: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    ServiceProcess::spawn(&bin(args, name), &refs)
}

async fn ready(port: u16, what: &str, process: &ServiceProcess) {
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if voicerooms_testkit::conformance::status_of(&url).await == Some(200) {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what} not ready within 90 s:\n{}", process.output());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(args: &Args, http: &reqwest::Client) -> anyhow::Result<(Stack, World)> {
    let nats = NatsServer::start().await;
    let sim_port = free_port();
    let sim = spawn(
        args,
        "discord-sim",
        with_extra(
            args,
            "discord-sim",
            vec![
                ("DISCORD_SIM__BIND", format!("127.0.0.1:{sim_port}")),
                ("DISCORD_SIM__RATE_LIMIT__ENABLED", "false".into()),
                ("RUST_LOG", "warn".into()),
            ],
        ),
    );
    let sim_base = format!("http://127.0.0.1:{sim_port}");
    let urls: Value = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{sim_base}/_sim")).send().await {
                if r.status().is_success() {
                    break r.json().await?;
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "simulator not up: {}",
                sim.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let sim_api = urls["api"].as_str().context("api url")?.to_owned();
    let sim_gateway = urls["gateway"].as_str().context("gateway url")?.to_owned();
    let world = World::build(args, http, &sim_base).await?;
    eprintln!(
        "world: {} guilds, {} players, {} voice actors",
        world.guilds.len(),
        world.players.len(),
        world.actors.len()
    );

    let guild_list = world
        .guilds
        .iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let common = |port: u16, instance: &str| {
        vec![
            ("VOICEROOMS__NATS__URL", nats.url()),
            ("VOICEROOMS__HTTP__PORT", port.to_string()),
            ("VOICEROOMS__INSTANCE", instance.to_owned()),
            ("VOICEROOMS__LOG__LEVEL", "warn".to_owned()),
            ("VOICEROOMS__DISCORD__TOKEN", SIM_BOT_TOKEN.to_owned()),
            ("VOICEROOMS__DISCORD__API_BASE", sim_api.clone()),
        ]
    };
    let gateway_port = free_port();
    let mut env = common(gateway_port, "gl-bench");
    env.push(("VOICEROOMS__GATEWAY__URL", sim_gateway.clone()));
    let gateway = spawn(
        args,
        "gateway-listener",
        with_extra(args, "gateway-listener", env),
    );
    let manager_port = free_port();
    let mut env = common(manager_port, "rm-bench");
    env.extend([
        ("VOICEROOMS__INVITES__SECRET", INVITE_SECRET.to_owned()),
        ("VOICEROOMS__ROOMS__GUILDS", guild_list),
        // Each player owns rooms / players rooms (room-manager allows at most 100).
        (
            "VOICEROOMS__ROOMS__MAX_PER_USER",
            args.rooms.div_ceil(args.players).to_string(),
        ),
        // Rooms whose channel is empty are closed after this: none during a run.
        ("VOICEROOMS__ROOMS__IDLE_TIMEOUT_MS", "86400000".to_owned()),
        (
            "VOICEROOMS__ROOM_MANAGER__GLOBAL_RATE_LIMIT",
            "65535".to_owned(),
        ),
    ]);
    let manager = spawn(args, "room-manager", with_extra(args, "room-manager", env));
    let mut edges = Vec::new();
    for i in 0..args.edges {
        let port = free_port();
        let mut env = common(port, &format!("edge-{i}"));
        env.extend([
            ("VOICEROOMS__SESSION__KEY", SESSION_KEY.to_owned()),
            ("VOICEROOMS__OAUTH__CLIENT_ID", SIM_CLIENT_ID.to_owned()),
            (
                "VOICEROOMS__OAUTH__CLIENT_SECRET",
                SIM_CLIENT_SECRET.to_owned(),
            ),
            (
                "VOICEROOMS__OAUTH__AUTHORIZE_URL",
                format!("{sim_base}/oauth2/authorize"),
            ),
            (
                "VOICEROOMS__OAUTH__TOKEN_URL",
                format!("{sim_base}/api/oauth2/token"),
            ),
            (
                "VOICEROOMS__OAUTH__REVOKE_URL",
                format!("{sim_base}/api/oauth2/token/revoke"),
            ),
            ("VOICEROOMS__OAUTH__API_BASE", sim_api.clone()),
            (
                "VOICEROOMS__OAUTH__REDIRECT_URL",
                format!("http://127.0.0.1:{port}/auth/callback"),
            ),
            (
                "VOICEROOMS__WEBSOCKET__MAX_CONNECTIONS_PER_USER",
                "1000000".to_owned(),
            ),
            (
                "VOICEROOMS__WEBSOCKET__MAX_CONNECTIONS",
                "1000000".to_owned(),
            ),
            (
                "VOICEROOMS__NATS__SUBSCRIPTION_CAPACITY",
                "65536".to_owned(),
            ),
        ]);
        edges.push((spawn(args, "edge", with_extra(args, "edge", env)), port));
    }
    ready(gateway_port, "gateway-listener", &gateway).await;
    ready(manager_port, "room-manager", &manager).await;
    for (i, (edge, port)) in edges.iter().enumerate() {
        ready(*port, &format!("edge-{i}"), edge).await;
    }
    Ok((
        Stack {
            nats,
            sim,
            sim_base,
            gateway,
            manager,
            edges,
        },
        world,
    ))
}

/// Guilds, players and voice actors made through the simulator's control API.
struct World {
    guilds: Vec<u64>,
    /// (id, username)
    players: Vec<(u64, String)>,
    /// One per room: (id, guild).
    actors: Vec<(u64, u64)>,
}

async fn sim_post(http: &reqwest::Client, url: String, body: Value) -> anyhow::Result<Value> {
    let r = http.post(&url).json(&body).send().await?;
    let status = r.status();
    let text = r.text().await?;
    anyhow::ensure!(status.is_success(), "{url}: {status} {text}");
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn id_of(v: &Value) -> anyhow::Result<u64> {
    v["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v["id"].as_u64())
        .with_context(|| format!("no id in {v}"))
}

impl World {
    async fn build(args: &Args, http: &reqwest::Client, sim: &str) -> anyhow::Result<World> {
        let n_guilds = args.rooms.div_ceil(ROOMS_PER_GUILD);
        let mut guilds = Vec::new();
        for g in 0..n_guilds {
            let v = sim_post(
                http,
                format!("{sim}/_sim/guilds"),
                json!({"name": format!("bench-{g}"), "bot_member": true}),
            )
            .await?;
            guilds.push(id_of(&v)?);
        }
        let mut players = Vec::new();
        for p in 0..args.players {
            let name = format!("player{p}");
            let v = sim_post(
                http,
                format!("{sim}/_sim/users"),
                json!({"username": name, "guilds": guilds}),
            )
            .await?;
            players.push((id_of(&v)?, name));
        }
        let actors = futures::stream::iter(0..args.rooms)
            .map(|r| {
                let guild = guilds[r / ROOMS_PER_GUILD];
                async move {
                    let v = sim_post(
                        http,
                        format!("{sim}/_sim/users"),
                        json!({"username": format!("actor{r}"), "guilds": [guild]}),
                    )
                    .await?;
                    anyhow::Ok((id_of(&v)?, guild))
                }
            })
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(World {
            guilds,
            players,
            actors,
        })
    }
}

fn cookie_value(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c[name.len() + 1..].split(';').next().map(str::to_owned))
}

/// The browser's login: edge `/auth/login` → the simulator's authorize (as `user`) → the edge's
/// callback; returns the session cookie.
async fn login(http: &reqwest::Client, edge_port: u16, user: u64) -> anyhow::Result<String> {
    let base = format!("http://127.0.0.1:{edge_port}");
    let start = http
        .get(format!("{base}/auth/login?return_to=%2F"))
        .send()
        .await?;
    anyhow::ensure!(start.status() == 302, "login: {}", start.status());
    let flow = cookie_value(&start, "vr_oauth").context("flow cookie")?;
    let authorize = start
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .context("authorize location")?;
    let consent = http
        .get(format!("{authorize}&sim_user={user}"))
        .send()
        .await?;
    anyhow::ensure!(consent.status() == 302, "authorize: {}", consent.status());
    let callback = consent
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .context("callback location")?
        .to_owned();
    let done = http
        .get(&callback)
        .header(reqwest::header::COOKIE, format!("vr_oauth={flow}"))
        .send()
        .await?;
    anyhow::ensure!(done.status() == 303, "callback: {}", done.status());
    cookie_value(&done, "vr_session").context("session cookie")
}

async fn request<C: serde::Serialize, R: serde::de::DeserializeOwned>(
    nats: &async_nats::Client,
    kind: CommandKind,
    cmd: &C,
) -> anyhow::Result<R> {
    let body = serde_json::to_vec(cmd)?;
    let mut last = String::new();
    for _ in 0..5 {
        match tokio::time::timeout(
            Duration::from_secs(15),
            nats.request(kind.subject(), body.clone().into()),
        )
        .await
        {
            Ok(Ok(reply)) => match decode_reply::<R>(&reply.payload) {
                Ok(r) => return Ok(r),
                Err(e) => last = format!("{e:?}"),
            },
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timeout".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("{} failed: {last}", kind.as_str())
}

/// One room as the load sees it.
struct Room {
    id: u64,
    actor: u64,
    /// Member index into the players of each client of this room.
    members: Vec<usize>,
}

/// The changes made in one room: (flag code, monotonic send time, wall µs).
#[derive(Default)]
struct RoomLog {
    changes: Vec<(u8, Instant, u64)>,
}

/// Everything the clients and the live observer record.
struct Recorder {
    logs: Vec<Mutex<RoomLog>>,
    index: HashMap<u64, usize>,
    samples: Mutex<Vec<u64>>,
    delivered: AtomicU64,
    lost: AtomicU64,
    reordered: AtomicU64,
    /// Sums in µs and counts of the split: request → gateway, gateway → edge frame, edge
    /// frame → client read (ms clocks), request → live republish (monotonic).
    to_gateway: Mutex<(i128, u64)>,
    gateway_to_edge: Mutex<(i128, u64)>,
    edge_to_client: Mutex<(i128, u64)>,
    to_live: Mutex<(i128, u64)>,
    recording: std::sync::atomic::AtomicBool,
}

fn add(sum: &Mutex<(i128, u64)>, v: i128) {
    let mut s = sum.lock().unwrap();
    s.0 += v;
    s.1 += 1;
}

fn mean_ms(sum: &Mutex<(i128, u64)>) -> f64 {
    let s = sum.lock().unwrap();
    if s.1 == 0 {
        f64::NAN
    } else {
        s.0 as f64 / s.1 as f64 / 1000.0
    }
}

/// The 4 bits of a change number as the actor's flags.
fn flags_for(k: usize) -> (u8, Value) {
    let code = (k % 16) as u8;
    let bit = |b: u8| code & (1 << b) != 0;
    (
        code,
        json!({"self_mute": bit(0), "self_video": bit(1), "self_stream": bit(2), "mute": bit(3),
               "self_deaf": false, "deaf": false}),
    )
}

fn code_of(flags: &Value) -> u8 {
    let bit = |name: &str, b: u8| {
        if flags[name].as_bool().unwrap_or(false) {
            1u8 << b
        } else {
            0
        }
    };
    bit("self_mute", 0) | bit("self_video", 1) | bit("self_stream", 2) | bit("mute", 3)
}

/// Where a reader is in one room's changes.
struct Cursor {
    next: usize,
}

impl Recorder {
    /// Matches a received change of `room` with flags `code` against the room's log; returns the
    /// change's send times. Frames skipped over are lost; a code not found ahead is reordered.
    fn matched(&self, room: usize, cursor: &mut Cursor, code: u8) -> Option<(Instant, u64)> {
        let log = self.logs[room].lock().unwrap();
        let ahead = log.changes.get(cursor.next..)?;
        let found = ahead.iter().position(|c| c.0 == code)?;
        if found > 0 {
            self.lost.fetch_add(found as u64, Ordering::Relaxed);
        }
        let (_, at, wall) = ahead[found];
        cursor.next += found + 1;
        Some((at, wall))
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(port: u16, cookie: &str, i: usize) -> anyhow::Result<Ws> {
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 16) as u8));
    let socket = TcpSocket::new_v4()?;
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
                anyhow::bail!("subscribe {room}: {t}")
            }
            Some(Ok(_)) => continue,
            other => anyhow::bail!("subscribe {room}: {other:?}"),
        }
    }
}

/// A client: reads its room's frames and records each `voice.updated` of the load.
async fn read_frames(mut ws: Ws, room: usize, recorder: Arc<Recorder>) {
    let mut cursor = Cursor { next: 0 };
    let mut last_seq = 0u64;
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let read_at = Instant::now();
        let read_wall = wall_us();
        if !recorder.recording.load(Ordering::Relaxed) || !text.contains("\"voice.updated\"") {
            continue;
        }
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let seq = frame["seq"].as_u64().unwrap_or(0);
        if seq <= last_seq {
            recorder.reordered.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        last_seq = seq;
        let code = code_of(&frame["payload"]["flags"]);
        let Some((sent_at, sent_wall)) = recorder.matched(room, &mut cursor, code) else {
            recorder.reordered.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        recorder.delivered.fetch_add(1, Ordering::Relaxed);
        recorder
            .samples
            .lock()
            .unwrap()
            .push(read_at.duration_since(sent_at).as_micros() as u64);
        let received_at = frame["received_at"].as_i64().unwrap_or(0) as i128 * 1000;
        let ts = frame["ts"].as_i64().unwrap_or(0) as i128 * 1000;
        // Millisecond clocks truncate: +0.5 ms makes the means unbiased.
        add(&recorder.to_gateway, received_at + 500 - sent_wall as i128);
        add(&recorder.gateway_to_edge, ts - received_at);
        add(&recorder.edge_to_client, read_wall as i128 - ts - 500);
    }
}

/// Observes the stream's republish (`live.rooms.>`): request → stored and republished.
async fn observe_live(nats: async_nats::Client, recorder: Arc<Recorder>) -> anyhow::Result<()> {
    let mut sub = nats.subscribe("live.rooms.>").await?;
    tokio::spawn(async move {
        let mut cursors: HashMap<usize, Cursor> = HashMap::new();
        while let Some(m) = sub.next().await {
            let at = Instant::now();
            if !recorder.recording.load(Ordering::Relaxed) || !m.subject.ends_with("voice.updated")
            {
                continue;
            }
            let Some(room) = m
                .subject
                .split('.')
                .nth(3)
                .and_then(|r| r.parse::<u64>().ok())
                .and_then(|r| recorder.index.get(&r).copied())
            else {
                continue;
            };
            let Ok(event) = serde_json::from_slice::<Value>(&m.payload) else {
                continue;
            };
            let code = code_of(&event["data"]["flags"]);
            let cursor = cursors.entry(room).or_insert(Cursor { next: 0 });
            let log = recorder.logs[room].lock().unwrap();
            if let Some(found) = log
                .changes
                .get(cursor.next..)
                .and_then(|ahead| ahead.iter().position(|c| c.0 == code))
            {
                let (_, sent, _) = log.changes[cursor.next + found];
                cursor.next += found + 1;
                drop(log);
                add(
                    &recorder.to_live,
                    at.duration_since(sent).as_micros() as i128,
                );
            }
        }
    });
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(256)
        .build()?;
    let setup_started = Instant::now();
    let (stack, world) = start(&args, &http).await?;
    let nats = async_nats::connect(stack.nats.url()).await?;
    let ports: Vec<u16> = stack.edges.iter().map(|(_, p)| *p).collect();

    // Players log in through the first edge (sessions are shared through NATS).
    let cookies: Vec<String> = futures::stream::iter(world.players.iter())
        .map(|(id, _)| login(&http, ports[0], *id))
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "{} players logged in ({:.1} s)",
        cookies.len(),
        setup_started.elapsed().as_secs_f64()
    );

    // Rooms: player r % P owns room r; the next members join by invite.
    let per_room = args.clients / args.rooms;
    let user_ref = |p: usize| UserRef {
        id: UserId::new(world.players[p].0).unwrap(),
        username: world.players[p].1.clone(),
        global_name: None,
        avatar: None,
    };
    let rooms: Vec<Room> = futures::stream::iter(0..args.rooms)
        .map(|r| {
            let nats = nats.clone();
            let owner = r % args.players;
            let guild = GuildId::new(world.actors[r].1).unwrap();
            let create = CreateRoom {
                requester: user_ref(owner),
                guild,
                name: format!("bench {r}"),
                idempotency_key: Some(format!("bench-{r}")),
            };
            let joiners: Vec<usize> = (1..per_room).map(|j| (owner + j) % args.players).collect();
            let joins: Vec<UserRef> = joiners.iter().map(|p| user_ref(*p)).collect();
            let actor = world.actors[r].0;
            let http = http.clone();
            let sim = stack.sim_base.clone();
            async move {
                let created: Created = request(&nats, CommandKind::Create, &create).await?;
                for joiner in joins {
                    let _: Joined = request(
                        &nats,
                        CommandKind::Join,
                        &JoinRoom {
                            requester: joiner,
                            invite: created.invite.token.clone(),
                            room: None,
                        },
                    )
                    .await?;
                }
                // The room's voice actor: its role, then its voice channel.
                let room = created.room.id.get();
                let role = created.room.role.get();
                let r = http
                    .put(format!(
                        "{sim}/_sim/guilds/{}/members/{actor}/roles/{role}",
                        guild.get()
                    ))
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "actor role: {}", r.status());
                sim_post(
                    &http,
                    format!("{sim}/_sim/voice/connect"),
                    json!({"user_id": actor.to_string(), "channel_id": room.to_string()}),
                )
                .await?;
                let mut members = vec![owner];
                members.extend(joiners);
                anyhow::Ok(Room {
                    id: room,
                    actor,
                    members,
                })
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "{} rooms created and joined ({:.1} s)",
        rooms.len(),
        setup_started.elapsed().as_secs_f64()
    );

    let recorder = Arc::new(Recorder {
        logs: (0..rooms.len()).map(|_| Mutex::default()).collect(),
        index: rooms.iter().enumerate().map(|(i, r)| (r.id, i)).collect(),
        samples: Mutex::new(Vec::new()),
        delivered: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        reordered: AtomicU64::new(0),
        to_gateway: Mutex::default(),
        gateway_to_edge: Mutex::default(),
        edge_to_client: Mutex::default(),
        to_live: Mutex::default(),
        recording: std::sync::atomic::AtomicBool::new(false),
    });
    observe_live(nats.clone(), recorder.clone()).await?;

    // Clients: every member of every room, over the edges in turn.
    let ready = Arc::new(AtomicUsize::new(0));
    let limiter = Arc::new(tokio::sync::Semaphore::new(128));
    let mut clients = Vec::new();
    let mut n = 0usize;
    for (ri, room) in rooms.iter().enumerate() {
        for member in &room.members {
            let permit = limiter.clone().acquire_owned().await?;
            let port = ports[n % ports.len()];
            let cookie = cookies[*member].clone();
            let (recorder, ready) = (recorder.clone(), ready.clone());
            let room_id = room.id;
            let i = n;
            clients.push(tokio::spawn(async move {
                let mut ws = match connect(port, &cookie, i).await {
                    Ok(ws) => ws,
                    Err(e) => {
                        eprintln!("client {i}: {e}");
                        return;
                    }
                };
                if let Err(e) = subscribe(&mut ws, room_id).await {
                    eprintln!("client {i}: {e}");
                    return;
                }
                drop(permit);
                ready.fetch_add(1, Ordering::Relaxed);
                read_frames(ws, ri, recorder).await;
            }));
            n += 1;
        }
    }
    let total_clients = n;
    wait_until(Duration::from_secs(600), "clients subscribed", || {
        let ready = ready.clone();
        async move { ready.load(Ordering::Relaxed) >= total_clients }
    })
    .await;
    eprintln!(
        "{total_clients} clients subscribed over {} edge(s) ({:.1} s); edge RSS {} MiB",
        ports.len(),
        setup_started.elapsed().as_secs_f64(),
        stack
            .edges
            .iter()
            .map(|(e, _)| format!("{:.0}", rss_mib(e.pid())))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    // Let the set-up's events drain before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Load: change i goes to room i % R; a room's next change waits for its previous answer.
    let pids = stack.pids();
    let cpu_before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    recorder.recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let total = args.rate * args.seconds;
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let room_locks: Arc<Vec<tokio::sync::Mutex<usize>>> = Arc::new(
        (0..rooms.len())
            .map(|_| tokio::sync::Mutex::new(0))
            .collect(),
    );
    let failed = Arc::new(AtomicU64::new(0));
    let mut inflight = futures::stream::FuturesUnordered::new();
    let actors: Arc<Vec<u64>> = Arc::new(rooms.iter().map(|r| r.actor).collect());
    for i in 0..total as usize {
        ticker.tick().await;
        let r = i % rooms.len();
        let (recorder, locks, actors, http, failed) = (
            recorder.clone(),
            room_locks.clone(),
            actors.clone(),
            http.clone(),
            failed.clone(),
        );
        let url = format!("{}/_sim/voice/state", stack.sim_base);
        inflight.push(tokio::spawn(async move {
            let mut k = locks[r].lock().await;
            *k += 1;
            let (code, mut body) = flags_for(*k);
            body["user_id"] = json!(actors[r].to_string());
            let sent = Instant::now();
            recorder.logs[r]
                .lock()
                .unwrap()
                .changes
                .push((code, sent, wall_us()));
            match http.post(&url).json(&body).send().await {
                Ok(resp) if resp.status().is_success() => {}
                other => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("voice change failed: {other:?}");
                    }
                }
            }
        }));
        while inflight.len() > 4096 {
            inflight.next().await;
        }
        // Reap finished requests without waiting.
        while let Some(Some(_)) = futures::FutureExt::now_or_never(inflight.next()) {}
    }
    while inflight.next().await.is_some() {}
    let issued = started.elapsed();
    let want: u64 = rooms
        .iter()
        .enumerate()
        .map(|(i, r)| {
            recorder.logs[i].lock().unwrap().changes.len() as u64 * r.members.len() as u64
        })
        .sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorder.delivered.load(Ordering::Relaxed) + recorder.lost.load(Ordering::Relaxed) < want
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu_before)
        .map(|((_, p), before)| cpu_seconds(*p) - before)
        .collect();
    recorder.recording.store(false, Ordering::Relaxed);

    let delivered = recorder.delivered.load(Ordering::Relaxed);
    let mut samples = std::mem::take(&mut *recorder.samples.lock().unwrap());
    samples.sort_unstable();
    println!(
        "vr-bench: {} rooms, {} clients over {} edge(s), {} players; {} changes at {}/s (issued in {:.1} s, {} failed)",
        rooms.len(),
        total_clients,
        ports.len(),
        cookies.len(),
        total,
        args.rate,
        issued.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "frames: {delivered} of {want} delivered, {} lost (never read), {} reordered/unmatched",
        want.saturating_sub(delivered),
        recorder.reordered.load(Ordering::Relaxed),
    );
    println!(
        "latency change request → client read: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        percentile(&samples, 0.999),
        percentile(&samples, 1.0),
    );
    println!(
        "mean split: request → gateway receipt {:.2} ms*; request → stored and republished {:.2} ms; gateway receipt → edge frame {:.2} ms*; edge frame → client read {:.2} ms* (* millisecond wall clocks)",
        mean_ms(&recorder.to_gateway),
        mean_ms(&recorder.to_live),
        mean_ms(&recorder.gateway_to_edge),
        mean_ms(&recorder.edge_to_client),
    );
    let per_process: Vec<String> = pids
        .iter()
        .zip(&cpu)
        .map(|((name, _), c)| format!("{name} {:.2}", c / elapsed))
        .collect();
    println!(
        "CPU (cores over {:.1} s): {}; load average {}",
        elapsed,
        per_process.join(", "),
        loadavg()
    );
    let edge_cpu: f64 = pids
        .iter()
        .zip(&cpu)
        .filter(|((name, _), _)| name.starts_with("edge"))
        .map(|(_, c)| c)
        .sum();
    println!(
        "edge: {:.0} frames per edge CPU-second; RSS {} MiB",
        delivered as f64 / edge_cpu.max(1e-9),
        stack
            .edges
            .iter()
            .map(|(e, _)| format!("{:.0}", rss_mib(e.pid())))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    for c in clients {
        c.abort();
    }
    if delivered < want {
        std::process::exit(1);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}
