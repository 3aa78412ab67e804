//! Supervised long-running tasks: the room API, the event consumer and the periodic loops each
//! run in their own task; when one returns, fails or panics before shutdown it is restarted with
//! backoff (`restart_backoff_ms`, doubling to 30 s, jittered), and `/readyz` reports the
//! service not ready while a required one (the room API, the event consumer) is not running.
//! A component says it runs ([`Up::set`]) only once it really does — the API once its
//! endpoints exist, the consumer once its durable consumer delivers.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicerooms_platform::retry::{Backoff, Jitter};

/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A component that ran this long before stopping is restarted with the first delay again.
const STABLE_AFTER: Duration = Duration::from_secs(60);

type Labels = Vec<(String, String)>;

#[derive(Default)]
struct State {
    /// Component → running.
    up: BTreeMap<&'static str, bool>,
    aborts: BTreeMap<&'static str, AbortHandle>,
}

/// Which components run; shared by the supervisor, the components and the readiness check.
#[derive(Clone, Default)]
pub struct Health {
    /// A std mutex: held for a lookup or an update, never across an await.
    state: Arc<Mutex<State>>,
    running: Family<Labels, Gauge>,
    restarts: Family<Labels, Counter>,
}

impl Health {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "room_manager_component_up",
            "1 while a long-running room-manager task runs",
            self.running.clone(),
        );
        r.register(
            "room_manager_component_restarts",
            "Restarts of long-running room-manager tasks after they stopped or panicked",
            self.restarts.clone(),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, name: &'static str, up: bool) {
        self.lock().up.insert(name, up);
        self.running
            .get_or_create(&vec![("component".to_owned(), name.to_owned())])
            .set(i64::from(up));
    }

    /// `Ok` when every component in `required` runs; else the ones that do not.
    pub fn check(&self, required: &[&'static str]) -> Result<(), String> {
        let state = self.lock();
        let down: Vec<&str> = required
            .iter()
            .filter(|n| !state.up.get(*n).copied().unwrap_or(false))
            .copied()
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!("not running: {}", down.join(", ")))
        }
    }

    /// Restarts of `name` so far.
    pub fn restarts(&self, name: &str) -> u64 {
        self.restarts
            .get_or_create(&vec![("component".to_owned(), name.to_owned())])
            .get()
    }

    /// Aborts the running instance of `name`, as a crash would (tests, and operators'
    /// drills). Returns whether one was running.
    pub fn abort(&self, name: &str) -> bool {
        match self.lock().aborts.get(name) {
            Some(h) => {
                h.abort();
                true
            }
            None => false,
        }
    }
}

/// A component's handle on its own "running" flag.
#[derive(Clone)]
pub struct Up {
    name: &'static str,
    health: Health,
}

impl Up {
    pub fn set(&self, up: bool) {
        self.health.set(self.name, up);
    }
}

/// Starts and restarts components.
#[derive(Clone)]
pub struct Supervisor {
    pub health: Health,
    tasks: TaskTracker,
    token: CancellationToken,
    backoff: Duration,
}

impl Supervisor {
    pub fn new(
        health: Health,
        tasks: TaskTracker,
        token: CancellationToken,
        backoff: Duration,
    ) -> Self {
        Self {
            health,
            tasks,
            token,
            backoff: backoff.max(Duration::from_millis(1)),
        }
    }

    /// Runs `make(up)` as component `name` until shutdown, restarting it whenever it ends.
    pub fn spawn<F, Fut>(&self, name: &'static str, make: F)
    where
        F: Fn(Up) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (health, token) = (self.health.clone(), self.token.clone());
        let policy = Backoff::new(self.backoff, MAX_BACKOFF).with_jitter(Jitter::Equal);
        health.set(name, false);
        self.tasks.spawn(async move {
            let mut failures = policy.schedule();
            loop {
                let up = Up {
                    name,
                    health: health.clone(),
                };
                let started = Instant::now();
                // Its own task: a panic or an abort ends that task, not the supervisor.
                let handle = tokio::spawn(make(up));
                health.lock().aborts.insert(name, handle.abort_handle());
                let result = handle.await;
                health.set(name, false);
                health.lock().aborts.remove(name);
                if token.is_cancelled() {
                    return;
                }
                match result {
                    Ok(Ok(())) => {
                        tracing::error!(component = name, "stopped unexpectedly; restarting")
                    }
                    Ok(Err(e)) => tracing::error!(
                        component = name,
                        error = format!("{e:#}"),
                        "failed; restarting"
                    ),
                    Err(e) if e.is_panic() => {
                        tracing::error!(component = name, "panicked; restarting")
                    }
                    Err(_) => tracing::error!(component = name, "was killed; restarting"),
                }
                health
                    .restarts
                    .get_or_create(&vec![("component".to_owned(), name.to_owned())])
                    .inc();
                if started.elapsed() >= STABLE_AFTER {
                    failures.reset();
                }
                let delay = failures.next_delay().unwrap_or(MAX_BACKOFF);
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        });
    }
}
