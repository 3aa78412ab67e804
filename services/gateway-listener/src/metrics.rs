//! Gateway metrics (`voicerooms_gateway_*` on `/metrics`).

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use voicerooms_contract::status::GatewayState;

#[derive(Clone)]
pub struct Metrics {
    /// 1 for the current state, 0 for the others.
    pub state: Family<Vec<(String, String)>, Gauge>,
    /// 1 while this replica holds a connected session (0 on a standby).
    pub connected: Gauge,
    /// Consecutive failed connection attempts.
    pub attempts: Gauge,
    pub resumes: Counter,
    pub identifies: Counter,
    pub heartbeat_rtt: Histogram,
    /// Seconds since the last heartbeat ACK, updated at every heartbeat and ACK.
    pub last_ack_age: Gauge<f64, AtomicU64>,
    /// Gateway dispatches received.
    pub events_in: Counter,
    /// Events stored in the ROOMS stream.
    pub events_out: Counter,
    /// Publishes the stream recognised as duplicates (replays, retries).
    pub events_duplicate: Counter,
    /// Gateway payloads rejected as malformed.
    pub events_rejected: Counter,
    pub publish_latency: Histogram,
    pub publish_retries: Counter,
    /// Dispatches waiting to be published.
    pub queue_depth: Gauge,
    /// Operator alerts raised (and resolved) by this replica, by service, code and severity.
    pub operator_alerts: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            state: Family::default(),
            connected: Gauge::default(),
            attempts: Gauge::default(),
            resumes: Counter::default(),
            identifies: Counter::default(),
            heartbeat_rtt: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            last_ack_age: Gauge::default(),
            events_in: Counter::default(),
            events_out: Counter::default(),
            events_duplicate: Counter::default(),
            events_rejected: Counter::default(),
            publish_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            publish_retries: Counter::default(),
            queue_depth: Gauge::default(),
            operator_alerts: Family::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "operator_alerts",
            "Operator alerts raised on ops.alerts.<service>, by code and severity",
            self.operator_alerts.clone(),
        );
        r.register(
            "gateway_connected",
            "1 while this replica holds a connected gateway session",
            self.connected.clone(),
        );
        r.register(
            "gateway_state",
            "Gateway connection state (1 = current)",
            self.state.clone(),
        );
        r.register(
            "gateway_attempts",
            "Consecutive failed connection attempts",
            self.attempts.clone(),
        );
        r.register("gateway_resumes", "Sessions resumed", self.resumes.clone());
        r.register(
            "gateway_identifies",
            "Sessions identified",
            self.identifies.clone(),
        );
        r.register(
            "gateway_heartbeat_rtt_seconds",
            "Heartbeat to ACK round trip",
            self.heartbeat_rtt.clone(),
        );
        r.register(
            "gateway_last_ack_age_seconds",
            "Age of the last heartbeat ACK",
            self.last_ack_age.clone(),
        );
        r.register(
            "gateway_events_in",
            "Gateway dispatches received",
            self.events_in.clone(),
        );
        r.register(
            "gateway_events_out",
            "Events stored in the ROOMS stream",
            self.events_out.clone(),
        );
        r.register(
            "gateway_events_duplicate",
            "Publishes de-duplicated by the stream",
            self.events_duplicate.clone(),
        );
        r.register(
            "gateway_events_rejected",
            "Gateway payloads rejected as malformed",
            self.events_rejected.clone(),
        );
        r.register(
            "gateway_publish_latency_seconds",
            "JetStream publish to ack",
            self.publish_latency.clone(),
        );
        r.register(
            "gateway_publish_retries",
            "Publish rounds retried",
            self.publish_retries.clone(),
        );
        r.register(
            "gateway_queue_depth",
            "Dispatches waiting to be published",
            self.queue_depth.clone(),
        );
    }

    pub fn set_state(&self, state: GatewayState) {
        self.connected
            .set(i64::from(state == GatewayState::Connected));
        for s in GatewayState::ALL {
            self.state
                .get_or_create(&vec![("state".to_owned(), s.as_str().to_owned())])
                .set(i64::from(s == state));
        }
    }
}
