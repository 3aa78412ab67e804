//! The edge's Prometheus metrics (all prefixed `voicerooms_edge_`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets (seconds): fine below 10 ms, where the targets are.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 1.0, 5.0,
];

/// Shared handles; cloning shares the same series.
#[derive(Clone)]
pub struct EdgeMetrics {
    pub connections: Gauge,
    pub subscriptions: Gauge,
    pub rooms: Gauge,
    pub events_in: Counter,
    pub messages_out: Counter,
    pub replayed: Counter,
    pub repairs: Counter,
    pub bad_events: Counter,
    pub bad_frames: Counter,
    pub slow_consumer_closes: Counter,
    /// Bytes of frames waiting in all connections' outgoing queues (queue depth).
    pub queued_bytes: Gauge,
    pub auth_failures: Counter,
    pub rejected_connections: Counter,
    /// JetStream API calls made by catch-ups and repairs (paced by `jetstream_rate`).
    pub jetstream_calls: Counter,
    /// Subscriptions ended by the server: membership removed, room deleted.
    pub revocations: Counter,
    /// Catch-ups answered with a snapshot because the replay would have been too large.
    pub snapshot_fallbacks: Counter,
    /// Room pumps that ended abnormally (their subscribers were told to resubscribe).
    pub pump_failures: Counter,
    /// Connections closed because their session ended (logout, failed refresh).
    pub sessions_ended: Counter,
    /// Connections refused at the upgrade for a foreign `Origin`.
    pub refused_origins: Counter,
    /// Seconds from the event's `received_at` (gateway receive time) to its fan-out here.
    pub fanout_latency: Histogram,
    /// Seconds from `received_at` to the frame's hand-off to each client's socket.
    pub delivery_latency: Histogram,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self {
            connections: Gauge::default(),
            subscriptions: Gauge::default(),
            rooms: Gauge::default(),
            events_in: Counter::default(),
            messages_out: Counter::default(),
            replayed: Counter::default(),
            repairs: Counter::default(),
            bad_events: Counter::default(),
            bad_frames: Counter::default(),
            slow_consumer_closes: Counter::default(),
            queued_bytes: Gauge::default(),
            auth_failures: Counter::default(),
            rejected_connections: Counter::default(),
            jetstream_calls: Counter::default(),
            revocations: Counter::default(),
            snapshot_fallbacks: Counter::default(),
            pump_failures: Counter::default(),
            sessions_ended: Counter::default(),
            refused_origins: Counter::default(),
            fanout_latency: Histogram::new(LATENCY_BUCKETS),
            delivery_latency: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl EdgeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("edge");
        r.register(
            "connections",
            "Open WebSocket connections",
            self.connections.clone(),
        );
        r.register(
            "subscriptions",
            "Room subscriptions across connections",
            self.subscriptions.clone(),
        );
        r.register(
            "rooms",
            "Rooms with a live NATS interest on this edge",
            self.rooms.clone(),
        );
        r.register(
            "events_in",
            "Room events received live",
            self.events_in.clone(),
        );
        r.register(
            "messages_out",
            "Event frames queued to connections",
            self.messages_out.clone(),
        );
        r.register(
            "replayed",
            "Events replayed from the stream to (re)subscribing clients",
            self.replayed.clone(),
        );
        r.register(
            "repairs",
            "Live-feed repairs from the stream (reconnects, gaps)",
            self.repairs.clone(),
        );
        r.register(
            "bad_events",
            "Undecodable events skipped",
            self.bad_events.clone(),
        );
        r.register(
            "bad_frames",
            "Rejected client frames",
            self.bad_frames.clone(),
        );
        r.register(
            "slow_consumer_closes",
            "Connections closed with 1008 for a full queue",
            self.slow_consumer_closes.clone(),
        );
        r.register(
            "queued_bytes",
            "Bytes of frames waiting in the outgoing queues of all connections (queue depth)",
            self.queued_bytes.clone(),
        );
        r.register(
            "auth_failures",
            "Failed WebSocket authentications",
            self.auth_failures.clone(),
        );
        r.register(
            "rejected_connections",
            "Connections refused by a limit",
            self.rejected_connections.clone(),
        );
        r.register(
            "jetstream_calls",
            "JetStream API calls of catch-ups and repairs",
            self.jetstream_calls.clone(),
        );
        r.register(
            "revocations",
            "Subscriptions ended by the server (member removed, room deleted)",
            self.revocations.clone(),
        );
        r.register(
            "snapshot_fallbacks",
            "Catch-ups answered with a snapshot because the replay would have been too large",
            self.snapshot_fallbacks.clone(),
        );
        r.register(
            "pump_failures",
            "Room pumps that ended abnormally",
            self.pump_failures.clone(),
        );
        r.register(
            "sessions_ended",
            "Connections closed because their session ended (logout, failed refresh)",
            self.sessions_ended.clone(),
        );
        r.register(
            "refused_origins",
            "WebSocket upgrades refused for a foreign Origin",
            self.refused_origins.clone(),
        );
        r.register(
            "fanout_latency_seconds",
            "From gateway receive time to fan-out on this edge",
            self.fanout_latency.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "From gateway receive time to the hand-off to each client's socket",
            self.delivery_latency.clone(),
        );
    }
}
