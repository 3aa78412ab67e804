//! room-manager's metrics (besides the Discord client's and the platform's).

use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use voicerooms_contract::event::CloseReason;
use voicerooms_contract::{now_ms, Millis};

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 30.0,
    ])
}

/// Counters, gauges and histograms of the room operations.
#[derive(Clone)]
pub struct Metrics {
    /// Operation latency by operation and outcome (seconds).
    pub ops: Family<Labels, Histogram>,
    /// Time from a join request to its placement, by outcome (seconds).
    pub placement: Family<Labels, Histogram>,
    /// Time from registering a pending move to firing it, by outcome (seconds).
    pub pending_fired: Family<Labels, Histogram>,
    /// Rooms by state, as of the last cleanup scan.
    pub rooms: Family<Labels, Gauge<i64, AtomicI64>>,
    /// Rooms deleted, by reason.
    pub deleted: Family<Labels, Counter>,
    /// Room events applied by the consumer, by kind.
    pub events_applied: Family<Labels, Counter>,
    /// Room events delivered more than once (an ack that did not arrive in time).
    pub events_redelivered: Counter,
    /// Failed creates whose Discord objects are still queued for deletion (last pass).
    pub cleanup_pending: Gauge<i64, AtomicI64>,
    /// Idle cleanup scans completed.
    pub cleanup_scans: Counter,
    /// Reconciler passes completed, and what they did.
    pub reconcile_passes: Counter,
    pub reconcile_actions: Family<Labels, Counter>,
    /// Unaccounted Discord objects seen by the last pass, waiting for their grace period.
    pub reconcile_suspects: Gauge<i64, AtomicI64>,
    /// Guilds the last pass could not reconcile because Discord refuses them (the bot is not
    /// in them, or they do not exist).
    pub reconcile_unreachable_guilds: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            ops: Family::new_with_constructor(latency_histogram),
            placement: Family::new_with_constructor(latency_histogram),
            pending_fired: Family::new_with_constructor(latency_histogram),
            rooms: Family::default(),
            deleted: Family::default(),
            events_applied: Family::default(),
            events_redelivered: Counter::default(),
            cleanup_pending: Gauge::default(),
            cleanup_scans: Counter::default(),
            reconcile_passes: Counter::default(),
            reconcile_actions: Family::default(),
            reconcile_suspects: Gauge::default(),
            reconcile_unreachable_guilds: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "room_operation_seconds",
            "Room operation latency by operation and outcome",
            self.ops.clone(),
        );
        r.register(
            "room_placement_seconds",
            "Join request to voice placement, by outcome",
            self.placement.clone(),
        );
        r.register(
            "room_pending_move_seconds",
            "Pending move registration to firing, by outcome",
            self.pending_fired.clone(),
        );
        r.register(
            "rooms",
            "Rooms by state (last cleanup scan)",
            self.rooms.clone(),
        );
        r.register(
            "rooms_deleted",
            "Rooms deleted by reason",
            self.deleted.clone(),
        );
        r.register(
            "room_events_applied",
            "Room events applied by the consumer, by kind",
            self.events_applied.clone(),
        );
        r.register(
            "room_events_redelivered",
            "Room events delivered again because their ack did not arrive in time",
            self.events_redelivered.clone(),
        );
        r.register(
            "room_cleanup_pending",
            "Failed creates whose Discord objects are still queued for deletion",
            self.cleanup_pending.clone(),
        );
        r.register(
            "room_cleanup_scans",
            "Idle cleanup scans completed",
            self.cleanup_scans.clone(),
        );
        r.register(
            "reconcile_passes",
            "Reconciler passes completed",
            self.reconcile_passes.clone(),
        );
        r.register(
            "reconcile_actions",
            "What the reconciler did: rolled_back, adopted, deleted, closed",
            self.reconcile_actions.clone(),
        );
        r.register(
            "reconcile_suspects",
            "Unaccounted Discord objects waiting for the reconciler's grace period",
            self.reconcile_suspects.clone(),
        );
        r.register(
            "reconcile_unreachable_guilds",
            "Guilds of the allow-list (or of stored rooms) Discord refuses: the bot is not in them",
            self.reconcile_unreachable_guilds.clone(),
        );
    }

    pub fn event_applied(&self, kind: &str) {
        self.events_applied
            .get_or_create(&vec![("kind".into(), kind.into())])
            .inc();
    }

    pub fn event_redelivered(&self) {
        self.events_redelivered.inc();
    }

    pub fn set_cleanup_pending(&self, n: usize) {
        self.cleanup_pending
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn reconciled(&self, report: &crate::reconcile::Report) {
        for (action, n) in [
            ("rolled_back", report.rolled_back),
            ("adopted", report.adopted),
            ("deleted", report.deleted),
            ("closed", report.closed),
        ] {
            self.reconcile_actions
                .get_or_create(&vec![("action".into(), action.into())])
                .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        }
        self.reconcile_suspects
            .set(i64::try_from(report.suspects).unwrap_or(i64::MAX));
        self.reconcile_unreachable_guilds
            .set(i64::try_from(report.unreachable_guilds).unwrap_or(i64::MAX));
        self.reconcile_passes.inc();
    }

    pub fn op(&self, op: &str, outcome: &str, started: Instant) {
        self.ops
            .get_or_create(&vec![
                ("op".into(), op.into()),
                ("outcome".into(), outcome.into()),
            ])
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn placement(&self, outcome: &str, started: Instant) {
        self.placement
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn placement_fired(&self, outcome: &str, registered_at: Millis) {
        self.pending_fired
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .observe(Duration::from_millis(now_ms().saturating_sub(registered_at)).as_secs_f64());
    }

    pub fn rooms_deleted(&self, reason: CloseReason) {
        let reason = match reason {
            CloseReason::Idle => "idle",
            CloseReason::Owner => "owner",
            CloseReason::ChannelDeleted => "channel_deleted",
        };
        self.deleted
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    pub fn set_rooms_by_state(&self, counts: [i64; 4]) {
        for (name, n) in ["creating", "open", "closing", "deleting"]
            .into_iter()
            .zip(counts)
        {
            self.rooms
                .get_or_create(&vec![("state".into(), name.into())])
                .set(n);
        }
    }
}
