//! `/healthz`, `/readyz` and `/metrics`, mounted on every service's HTTP server.
//!
//! - `/healthz`: the process is alive and serving HTTP (always 200 while it can answer).
//! - `/readyz`: every readiness check passes (e.g. NATS connected, gateway session up) and the
//!   service is not shutting down; otherwise 503 with the failing checks named.
//! - `/metrics`: Prometheus/OpenMetrics text of the service's registry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::{web, HttpResponse};
use prometheus_client::registry::Registry;
use serde::Serialize;

/// A readiness probe: `Ok` when ready, `Err(reason)` when not.
pub type ReadinessCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// State behind the operational endpoints.
pub struct Ops {
    service: &'static str,
    instance: String,
    registry: Registry,
    checks: Vec<(&'static str, ReadinessCheck)>,
    draining: AtomicBool,
}

impl Ops {
    pub fn new(service: &'static str, instance: String, registry: Registry) -> Self {
        Self {
            service,
            instance,
            registry,
            checks: Vec::new(),
            draining: AtomicBool::new(false),
        }
    }

    /// Adds a readiness check named `name`.
    pub fn with_check(
        mut self,
        name: &'static str,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.checks.push((name, Box::new(check)));
        self
    }

    /// From now on `/readyz` answers 503: the service is shutting down.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn service(&self) -> &'static str {
        self.service
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Runs every check; the failing ones with their reasons.
    pub fn readiness(&self) -> Readiness {
        let mut failing = Vec::new();
        if self.draining.load(Ordering::SeqCst) {
            failing.push(Failure {
                check: "shutdown",
                reason: "shutting down".into(),
            });
        }
        for (name, check) in &self.checks {
            if let Err(reason) = check() {
                failing.push(Failure {
                    check: name,
                    reason,
                });
            }
        }
        Readiness {
            ready: failing.is_empty(),
            service: self.service,
            instance: self.instance.clone(),
            failing,
        }
    }

    /// The registry in OpenMetrics text form.
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub struct Failure {
    pub check: &'static str,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub service: &'static str,
    pub instance: String,
    pub failing: Vec<Failure>,
}

/// Mounts the three endpoints; the app must hold `web::Data<Ops>`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

async fn healthz(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "status": "alive",
        "service": ops.service,
        "instance": ops.instance,
    }))
}

async fn readyz(ops: web::Data<Ops>) -> HttpResponse {
    let readiness = ops.readiness();
    if readiness.ready {
        HttpResponse::Ok().json(readiness)
    } else {
        HttpResponse::ServiceUnavailable().json(readiness)
    }
}

async fn metrics(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(ops.encode_metrics())
}

/// Shared handle, as services keep it.
pub type SharedOps = Arc<Ops>;

/// Container health probe (`<service> healthcheck`): `GET /readyz` on 127.0.0.1:`port` with a
/// 2 s timeout, using only std (the runtime image has no curl). Ok only when it answers 200: a
/// service that is alive but not ready (NATS down, gateway off, draining) is unhealthy, so
/// docker-compose's `service_healthy` and `ps` tell the truth.
pub fn probe(port: u16) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(head.get(..n).unwrap_or_default());
    if line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "readyz answered {:?}",
            line.lines().next().unwrap_or("")
        ))
    }
}
