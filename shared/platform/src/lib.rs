//! # voicerooms-platform
//!
//! What every voicerooms service shares, so each service's `main` is a few lines: load settings,
//! init telemetry, build, run until a shutdown signal.
//!
//! ## Layout
//! - [`settings`]: defaults in code → optional TOML file → `VOICEROOMS__…` environment variables;
//!   the common sections (`nats`, `http`, `log`, `telemetry`, `shutdown`, `instance`) and the
//!   [`settings::Secret`] type that never prints.
//! - [`telemetry`]: JSON or readable logs, OTLP trace export when configured, W3C trace context in
//!   NATS headers.
//! - [`nats`]: connection with background retries and logged events; the `ROOMS` stream and KV
//!   buckets.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`panics`]: the panic hook (installed by `telemetry::init` and `ServiceBuilder::new`): every
//!   panic outside test code is logged and, under `VOICEROOMS_PANIC_LOG`, recorded for the suite.
//! - [`retry`]: the one backoff policy ([`retry::Backoff`]: exponential, capped, jitter, attempt
//!   limit) and the [`retry::retry`] loop (classifier, cancellation token) every retry uses.
//! - [`runtime`]: [`runtime::ServiceBuilder`] / [`runtime::Service`]: bind (port 0 allowed), serve,
//!   and shut down gracefully (readiness off, cancel, wait tasks, drain NATS, stop HTTP).

pub mod nats;
pub mod ops;
pub mod panics;
pub mod retry;
pub mod runtime;
pub mod settings;
pub mod telemetry;

pub use runtime::{exit_code, signal, Service, ServiceBuilder};
pub use settings::{CheckSettings, CommonSettings, Secret, SettingsError};
