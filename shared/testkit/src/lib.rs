//! # voicerooms-testkit
//!
//! The one honest way to test against NATS here: every test (or test binary) starts its own
//! `nats-server` — JetStream on, a random free port on 127.0.0.1, a temporary store directory —
//! killed when dropped, and stoppable/restartable on the same port and store for fault tests. The
//! machine's shared NATS on 4222 is never used. A missing `nats-server` fails the test with a clear
//! message; nothing is skipped.
//!
//! ## Layout
//! - [`NatsServer`]: the private server.
//! - [`wait_until`]: poll a condition until a deadline (no bare sleeps in tests).
//! - [`ServiceProcess`]: run a service binary, read its output, send it SIGTERM, wait for its exit.
//! - [`free_port`]: a currently free loopback port.
//! - [`conformance`]: health, readiness, SIGTERM and bad-config checks every service runs.

// A test harness: a failure here (no nats-server, a timeout, a refused connection) is a failed test,
// so panicking with a clear message is the intended way to report it.
#![allow(clippy::panic, clippy::expect_used)]

pub mod conformance;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The file service panics are recorded in (`voicerooms_platform::panics`; set by
/// `scripts/test`). [`ServiceProcess`] passes it on to the services it starts.
pub const PANIC_LOG_VAR: &str = "VOICEROOMS_PANIC_LOG";

/// Environment variable that overrides the `nats-server` binary path.
pub const NATS_SERVER_BIN_VAR: &str = "NATS_SERVER_BIN";

/// A private `nats-server` with JetStream, killed on drop.
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port; panics with instructions if `nats-server` is missing.
    pub async fn start() -> NatsServer {
        let bin = find_nats_server();
        let mut last_error = String::new();
        for _ in 0..10 {
            let port = free_port();
            let mut server = NatsServer {
                bin: bin.clone(),
                port,
                dir: tempfile::Builder::new()
                    .prefix("voicerooms-nats-")
                    .tempdir()
                    .expect("creating a temp dir for nats-server"),
                child: None,
            };
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start nats-server after 10 attempts: {last_error}");
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A plain client connected to this server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to test nats-server at {}: {e}", self.url()))
    }

    /// Kills the server (like a crash: no lame-duck mode). The store directory is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.stop();
        let started = Instant::now();
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) if started.elapsed() > Duration::from_secs(10) => {
                    panic!("restarting nats-server: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let store = self.dir.path().join("jetstream");
        let log = self.dir.path().join("nats-server.log");
        let mut child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&store)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.bin.display()))?;
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("nats-server exited with {status}: {log}"));
            }
            if let Ok(client) = async_nats::connect(self.url()).await {
                // JetStream answers its API once it is up. (The typed account-info call does
                // not decode nats-server 2.9's reply, so look at the raw answer.)
                if let Ok(reply) = client.request("$JS.API.INFO", "".into()).await {
                    let body = String::from_utf8_lossy(&reply.payload);
                    if body.contains("account_info_response") && !body.contains("\"error\"") {
                        self.child = Some(child);
                        return Ok(());
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                return Err("nats-server did not become ready within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_nats_server() -> PathBuf {
    if let Ok(path) = std::env::var(NATS_SERVER_BIN_VAR) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")];
    for dir in std::env::split_paths(&path).chain(extra) {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "nats-server is not installed (looked on PATH, /usr/sbin, /usr/local/sbin). \
         Install it with `apt-get install nats-server` (scripts/test does this), or set \
         {NATS_SERVER_BIN_VAR} to its path. Tests that need NATS never skip."
    );
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Polls `condition` every 10 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return;
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A service binary running as a child process, its output collected line by line.
pub struct ServiceProcess {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl ServiceProcess {
    /// Starts `bin` with exactly `env` (plus PATH and the suite's [`PANIC_LOG_VAR`]), capturing
    /// stdout and stderr.
    pub fn spawn(bin: &str, env: &[(&str, String)]) -> ServiceProcess {
        let mut command = Command::new(bin);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The suite's panic log (scripts/test): a service's panic fails the run.
        if let Some(log) = std::env::var_os(PANIC_LOG_VAR) {
            command.env(PANIC_LOG_VAR, log);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            collect_lines(stdout, output.clone());
        }
        if let Some(stderr) = child.stderr.take() {
            collect_lines(stderr, output.clone());
        }
        ServiceProcess { child, output }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user + system) the process has used so far, in seconds, from
    /// `/proc/<pid>/stat` (benchmarks: cost per unit of work). 0 when unreadable.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which ends with the last ')'): utime is the 12th,
        // stime the 13th; in clock ticks (USER_HZ, 100 on Linux).
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
        ticks(11).saturating_add(ticks(12)) as f64 / 100.0
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect_lines<R: std::io::Read + Send + 'static>(reader: R, sink: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if let Ok(mut lines) = sink.lock() {
                // Bounded: a chatty process cannot exhaust the test's memory.
                if lines.len() < 100_000 {
                    lines.push(line);
                }
            }
        }
    });
}
