//! Gateway metrics (`voicerooms_gateway_*` on `/metrics`), labelled by shard.
//!
//! [`Metrics`] holds the families; [`ShardMetrics`] is one shard's handles into them. Every
//! replica reports `voicerooms_gateway_connected{shard}` for **every** shard of the pool — 1 where
//! it holds that shard with a connected session, 0 elsewhere — so `max by (shard)` over the
//! replicas is 0 exactly for a shard nobody holds connected (the per-shard alert), even when its
//! holder is gone and reports nothing.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use voicerooms_contract::status::GatewayState;

type Labels = Vec<(String, String)>;

fn shard_label(shard: u32) -> Labels {
    vec![("shard".to_owned(), shard.to_string())]
}

fn rtt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

fn publish_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

#[derive(Clone)]
pub struct Metrics {
    /// 1 for the current state, 0 for the others, by shard (shards this replica runs).
    pub state: Family<Labels, Gauge>,
    /// 1 while this replica holds the shard with a connected session; 0 for every other shard.
    pub connected: Family<Labels, Gauge>,
    /// Consecutive failed connection attempts.
    pub attempts: Family<Labels, Gauge>,
    pub resumes: Family<Labels, Counter>,
    pub identifies: Family<Labels, Counter>,
    pub heartbeat_rtt: Family<Labels, Histogram, fn() -> Histogram>,
    /// Seconds since the last heartbeat ACK, updated at every heartbeat and ACK.
    pub last_ack_age: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Gateway dispatches received.
    pub events_in: Family<Labels, Counter>,
    /// Events stored in the ROOMS stream.
    pub events_out: Family<Labels, Counter>,
    /// Publishes the stream recognised as duplicates (replays, retries).
    pub events_duplicate: Family<Labels, Counter>,
    /// Gateway payloads rejected as malformed.
    pub events_rejected: Family<Labels, Counter>,
    pub publish_latency: Family<Labels, Histogram, fn() -> Histogram>,
    pub publish_retries: Family<Labels, Counter>,
    /// Dispatches waiting to be published.
    pub queue_depth: Family<Labels, Gauge>,
    /// Operator alerts raised (and resolved) by this replica, by service, code and severity.
    pub operator_alerts: Family<Labels, Counter>,
    /// The pool: shards in it, live replicas seen, this replica's target and shards held.
    pub pool_shards: Gauge,
    pub pool_members: Gauge,
    pub pool_target: Gauge,
    pub pool_held: Gauge,
    /// 1 for each shard this replica holds (the pool's assignment, by shard).
    pub held: Family<Labels, Gauge>,
    /// Shards this replica handed over to rebalance the pool.
    pub handovers: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            state: Family::default(),
            connected: Family::default(),
            attempts: Family::default(),
            resumes: Family::default(),
            identifies: Family::default(),
            heartbeat_rtt: Family::new_with_constructor(rtt_histogram),
            last_ack_age: Family::default(),
            events_in: Family::default(),
            events_out: Family::default(),
            events_duplicate: Family::default(),
            events_rejected: Family::default(),
            publish_latency: Family::new_with_constructor(publish_histogram),
            publish_retries: Family::default(),
            queue_depth: Family::default(),
            operator_alerts: Family::default(),
            pool_shards: Gauge::default(),
            pool_members: Gauge::default(),
            pool_target: Gauge::default(),
            pool_held: Gauge::default(),
            held: Family::default(),
            handovers: Counter::default(),
        }
    }
}

/// One shard's metric handles (cheap clones of the family entries).
#[derive(Clone)]
pub struct ShardMetrics {
    shard: u32,
    state: Family<Labels, Gauge>,
    pub connected: Gauge,
    /// 1 while this replica holds the shard.
    pub held: Gauge,
    pub attempts: Gauge,
    pub resumes: Counter,
    pub identifies: Counter,
    pub heartbeat_rtt: Histogram,
    pub last_ack_age: Gauge<f64, AtomicU64>,
    pub events_in: Counter,
    pub events_out: Counter,
    pub events_duplicate: Counter,
    pub events_rejected: Counter,
    pub publish_latency: Histogram,
    pub publish_retries: Counter,
    pub queue_depth: Gauge,
}

impl ShardMetrics {
    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub fn set_state(&self, state: GatewayState) {
        self.connected
            .set(i64::from(state == GatewayState::Connected));
        for s in GatewayState::ALL {
            self.state
                .get_or_create(&vec![
                    ("shard".to_owned(), self.shard.to_string()),
                    ("state".to_owned(), s.as_str().to_owned()),
                ])
                .set(i64::from(s == state));
        }
    }

    /// This replica no longer runs the shard: `connected` 0, no state series.
    pub fn release(&self) {
        self.connected.set(0);
        self.held.set(0);
        for s in GatewayState::ALL {
            self.state.remove(&vec![
                ("shard".to_owned(), self.shard.to_string()),
                ("state".to_owned(), s.as_str().to_owned()),
            ]);
        }
    }
}

impl Metrics {
    /// The handles of one shard.
    pub fn shard(&self, shard: u32) -> ShardMetrics {
        let l = shard_label(shard);
        ShardMetrics {
            shard,
            state: self.state.clone(),
            connected: self.connected.get_or_create(&l).clone(),
            held: self.held.get_or_create(&l).clone(),
            attempts: self.attempts.get_or_create(&l).clone(),
            resumes: self.resumes.get_or_create(&l).clone(),
            identifies: self.identifies.get_or_create(&l).clone(),
            heartbeat_rtt: self.heartbeat_rtt.get_or_create(&l).clone(),
            last_ack_age: self.last_ack_age.get_or_create(&l).clone(),
            events_in: self.events_in.get_or_create(&l).clone(),
            events_out: self.events_out.get_or_create(&l).clone(),
            events_duplicate: self.events_duplicate.get_or_create(&l).clone(),
            events_rejected: self.events_rejected.get_or_create(&l).clone(),
            publish_latency: self.publish_latency.get_or_create(&l).clone(),
            publish_retries: self.publish_retries.get_or_create(&l).clone(),
            queue_depth: self.queue_depth.get_or_create(&l).clone(),
        }
    }

    /// Reports `connected{shard}` (0 unless set otherwise) for every shard of a pool of
    /// `count`: the series a per-shard alert needs even for shards this replica does not run.
    pub fn cover_pool(&self, count: u32) {
        for shard in 0..count {
            let _ = self.connected.get_or_create(&shard_label(shard));
            let _ = self.held.get_or_create(&shard_label(shard));
        }
        self.pool_shards.set(i64::from(count));
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "operator_alerts",
            "Operator alerts raised on ops.alerts.<service>, by code and severity",
            self.operator_alerts.clone(),
        );
        r.register(
            "gateway_connected",
            "1 while this replica holds the shard with a connected gateway session (0 for every other shard of the pool)",
            self.connected.clone(),
        );
        r.register(
            "gateway_pool_shards",
            "Shards in the gateway pool",
            self.pool_shards.clone(),
        );
        r.register(
            "gateway_pool_members",
            "Live replicas of the gateway pool, as this replica sees them",
            self.pool_members.clone(),
        );
        r.register(
            "gateway_pool_target",
            "Shards the pool's balance gives this replica",
            self.pool_target.clone(),
        );
        r.register(
            "gateway_pool_held",
            "Shards this replica holds",
            self.pool_held.clone(),
        );
        r.register(
            "gateway_shard_held",
            "1 for each shard this replica holds (the pool's assignment)",
            self.held.clone(),
        );
        r.register(
            "gateway_handovers",
            "Shards this replica handed over to rebalance the pool",
            self.handovers.clone(),
        );
        r.register(
            "gateway_state",
            "Gateway connection state of each shard this replica runs (1 = current)",
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
            "Publishes retried",
            self.publish_retries.clone(),
        );
        r.register(
            "gateway_queue_depth",
            "Dispatches waiting to be published",
            self.queue_depth.clone(),
        );
    }
}
