//! A shard's status, observable at any time: the last one in KV, republished periodically.
//!
//! Every state change is published on `gateway.<shard>.status` when it happens (the connection
//! loop's [`crate::connection::Reporter`]). A status published only on changes is invisible to an
//! operator who starts tailing in steady state (issue 15, defect 6), so this task also keeps the
//! latest one in the pool bucket (`shard-<id>-of-<count>.status`, read by `vr-tail --ops` at
//! start) and republishes it every `gateway.status_interval_ms`. A standby's status is only
//! republished: the key belongs to the shard's holder.

use std::time::Duration;

use async_nats::jetstream::kv;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::status::{pool_key, GatewayState, GatewayStatus};

/// Runs until `stop` fires or the reporter is gone.
pub async fn run(
    nats: async_nats::Client,
    kv: kv::Store,
    mut latest: watch::Receiver<Option<GatewayStatus>>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let republish = tokio::select! {
            _ = stop.cancelled() => return,
            changed = latest.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            _ = tick.tick() => true,
        };
        let Some(status) = latest.borrow_and_update().clone() else {
            continue;
        };
        let bytes = status.encode();
        if republish {
            if let Err(e) = nats.publish(status.subject(), bytes.clone().into()).await {
                tracing::debug!(error = %e, "status not republished");
            }
        }
        if status.state != GatewayState::Standby {
            let key = pool_key::status(status.shard, status.shard_count);
            let put = tokio::time::timeout(every, kv.put(key, bytes.into())).await;
            if !matches!(put, Ok(Ok(_))) {
                tracing::debug!("status not stored in KV");
            }
        }
    }
}
