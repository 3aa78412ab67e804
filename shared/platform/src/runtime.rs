//! The skeleton every service shares: NATS connection, metrics registry, HTTP server with the
//! operational endpoints, one cancellation token, one task tracker, and graceful shutdown.
//!
//! ```text
//! ServiceBuilder::new(name, &common)   connect NATS (background retries), base metrics
//!   .registry_mut() / .nats() / ...    the service registers metrics and spawns its tasks
//!   .start(checks, routes)             bind HTTP (port 0 allowed) → Service
//! Service::run_until_stopped(signal)   serve until `signal` resolves, then shut down:
//!   readiness off → cancel token → wait tasks (grace) → drain NATS → stop HTTP
//! ```

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpServer};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::nats::{self, NatsMetrics};
use crate::ops::{Ops, ReadinessCheck};
use crate::retry::{self, retry, Backoff, Jitter};
use crate::settings::CommonSettings;

/// Retrying start-up work (streams, buckets) while NATS is not there yet: quick at first, then
/// every 2.5-5 s, jittered so that replicas restarted together spread their JetStream calls.
pub const SETUP_BACKOFF: Backoff = Backoff::from_millis(100, 5_000).with_jitter(Jitter::Equal);

/// A service being assembled.
pub struct ServiceBuilder {
    service: &'static str,
    instance: String,
    common: CommonSettings,
    registry: Registry,
    nats: async_nats::Client,
    nats_events: tokio::sync::broadcast::Sender<nats::ConnectionEvent>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ServiceBuilder {
    /// Connects to NATS (retrying in the background) and registers the base metrics.
    pub async fn new(service: &'static str, common: &CommonSettings) -> anyhow::Result<Self> {
        // Also here, not only in `telemetry::init`: services built in-process by tests.
        crate::panics::install(service);
        let instance = common.instance_name(service);
        let mut registry = Registry::with_prefix("voicerooms");
        let info: Family<Vec<(String, String)>, Gauge> = Family::default();
        info.get_or_create(&vec![
            ("service".to_owned(), service.to_owned()),
            ("instance".to_owned(), instance.clone()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ])
        .set(1);
        registry.register("service_info", "Service name, instance and version", info);
        let nats_metrics = NatsMetrics::default();
        nats_metrics.register(&mut registry);
        let client_name = format!("{service}/{instance}");
        let nats_events = nats_metrics.notifier.clone();
        let nats = nats::connect(&common.nats, &client_name, nats_metrics).await?;
        tracing::info!(service, instance = %instance, nats = %common.nats.url, "starting");
        Ok(Self {
            service,
            instance,
            common: common.clone(),
            registry,
            nats,
            nats_events,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    pub fn service(&self) -> &'static str {
        self.service
    }
    pub fn instance(&self) -> &str {
        &self.instance
    }
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }
    /// Connection events of the service's NATS client (connected, disconnected, slow consumer).
    pub fn nats_events(&self) -> tokio::sync::broadcast::Receiver<nats::ConnectionEvent> {
        self.nats_events.subscribe()
    }
    /// The sender behind [`ServiceBuilder::nats_events`], for components that subscribe later.
    pub fn nats_events_sender(&self) -> tokio::sync::broadcast::Sender<nats::ConnectionEvent> {
        self.nats_events.clone()
    }
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }
    /// Cancelled when shutdown starts: every loop `select!`s on it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
    /// Tasks spawned here are awaited (within the grace period) at shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }
    pub fn common(&self) -> &CommonSettings {
        &self.common
    }

    /// Creates (or updates) the `ROOMS` stream in the background, retrying with backoff while
    /// NATS is unreachable. The returned check keeps the service unready until it succeeds.
    pub fn ensure_rooms_stream(&self) -> (&'static str, ReadinessCheck) {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let js = async_nats::jetstream::new(self.nats.clone());
        let settings = self.common.nats.clone();
        let token = self.shutdown.clone();
        self.tasks.spawn(async move {
            let ready = retry(
                "creating the ROOMS stream",
                &SETUP_BACKOFF,
                &token,
                retry::always,
                || nats::ensure_rooms_stream(&js, &settings),
            )
            .await;
            // Only cancellation ends an unlimited retry.
            if ready.is_ok() {
                flag.store(true, Ordering::SeqCst);
                tracing::info!("ROOMS stream ready");
            }
        });
        let check: ReadinessCheck = Box::new(move || {
            if done.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("ROOMS stream not yet created".into())
            }
        });
        ("rooms_stream", check)
    }

    /// Binds the HTTP server with the operational endpoints and `configure`'s routes.
    pub fn start<F>(
        self,
        checks: Vec<(&'static str, ReadinessCheck)>,
        configure: F,
    ) -> anyhow::Result<Service>
    where
        F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
    {
        let nats_for_check = self.nats.clone();
        let mut ops = Ops::new(self.service, self.instance.clone(), self.registry).with_check(
            "nats",
            move || {
                if nats::is_connected(&nats_for_check) {
                    Ok(())
                } else {
                    Err("not connected to NATS".into())
                }
            },
        );
        for (name, check) in checks {
            ops = ops.with_check(name, check);
        }
        let ops = Arc::new(ops);
        let grace = Duration::from_millis(self.common.shutdown.grace_period_ms);
        let addr = (self.common.http.host.as_str(), self.common.http.port);
        let listener = TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("binding http {}:{}: {e}", addr.0, addr.1))?;
        let port = listener.local_addr()?.port();
        let data = web::Data::from(ops.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .configure(crate::ops::routes)
                .configure(configure.clone())
        })
        // Small frames (WebSocket events) must not wait for Nagle's algorithm.
        .on_connect(|conn, _| {
            if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
                let _ = tcp.set_nodelay(true);
            }
        })
        .workers(self.common.http.workers)
        .disable_signals()
        .shutdown_timeout(grace.as_secs().max(1))
        .listen(listener)?
        .run();
        tracing::info!(service = self.service, port, "http listening");
        Ok(Service {
            service: self.service,
            port,
            server,
            ops,
            nats: self.nats,
            shutdown: self.shutdown,
            tasks: self.tasks,
            grace,
        })
    }
}

/// A built service: bound, connected, not yet serving.
pub struct Service {
    service: &'static str,
    port: u16,
    server: actix_web::dev::Server,
    ops: Arc<Ops>,
    nats: async_nats::Client,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    grace: Duration,
}

impl Service {
    /// The HTTP port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn ops(&self) -> &Arc<Ops> {
        &self.ops
    }

    /// Serves until `signal` resolves, then shuts down gracefully within the grace period.
    pub async fn run_until_stopped(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let mut server = tokio::spawn(self.server);
        tokio::select! {
            _ = signal => tracing::info!(service = self.service, "shutdown requested"),
            result = &mut server => {
                self.shutdown.cancel();
                return match result {
                    Ok(Ok(())) => Err(anyhow::anyhow!("http server stopped unexpectedly")),
                    Ok(Err(e)) => Err(anyhow::anyhow!("http server failed: {e}")),
                    Err(e) => Err(anyhow::anyhow!("http server task failed: {e}")),
                };
            }
        }
        let started = Instant::now();
        self.ops.set_draining();
        self.shutdown.cancel();
        self.tasks.close();
        let tasks_done = tokio::time::timeout(self.grace, self.tasks.wait())
            .await
            .is_ok();
        if !tasks_done {
            tracing::error!(
                service = self.service,
                grace_ms = self.grace.as_millis() as u64,
                "tasks still running at the end of the grace period"
            );
        }
        let remaining = self
            .grace
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(100));
        match tokio::time::timeout(remaining, self.nats.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "nats drain failed"),
            Err(_) => tracing::warn!("nats drain did not finish within the grace period"),
        }
        handle.stop(true).await;
        let _ = server.await;
        if tasks_done {
            tracing::info!(service = self.service, "stopped cleanly");
            Ok(())
        } else {
            Err(anyhow::anyhow!("shutdown grace period exceeded"))
        }
    }
}

/// Resolves on SIGTERM or SIGINT. Only binaries use it; tests pass their own future.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!(signal = "SIGINT", "signal received"),
        _ = term => tracing::info!(signal = "SIGTERM", "signal received"),
    }
}

/// Ends `main`: logs and prints the error chain on one line, and picks the exit code.
pub fn exit_code(service: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(service, error = format!("{e:#}"), "exiting with an error");
            eprintln!("{service}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
