//! The replica registry: each replica writes a heartbeat (`room_manager_replicas/<instance>`,
//! live until `until`) every second and counts the live ones, so the Discord client can take its
//! share of the bot's rate limits (one bucket request held back per other replica, the global
//! limit divided). A replica that stops gracefully removes its entry; a crashed one expires.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::TryStreamExt;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::now_ms;

use crate::rooms::Core;
use crate::store::{self, ReplicaBeat};
use crate::supervisor::Up;

/// How often a replica beats.
const BEAT: Duration = Duration::from_secs(1);
/// How long a beat counts.
const TTL_MS: u64 = 5_000;
/// Entries expired this long ago are removed (crashed replicas' leftovers).
const FORGET_MS: u64 = 60_000;

/// Writes this replica's heartbeat and returns the number of live replicas (at least 1).
pub async fn beat(bucket: &kv::Store, instance: &str) -> anyhow::Result<u32> {
    let now = now_ms();
    let mine = ReplicaBeat {
        until: now.saturating_add(TTL_MS),
    };
    bucket
        .put(instance, Bytes::from(serde_json::to_vec(&mine)?))
        .await?;
    let keys: Vec<String> = bucket.keys().await?.try_collect().await?;
    let mut live = 0u32;
    for key in keys {
        match store::get::<ReplicaBeat>(bucket, &key).await {
            Ok(Some((b, _))) if b.until > now => live = live.saturating_add(1),
            Ok(Some((b, _))) if now.saturating_sub(b.until) > FORGET_MS => {
                let _ = bucket.delete(&key).await;
            }
            _ => {}
        }
    }
    Ok(live.max(1))
}

/// Beats every second until shutdown, then removes this replica's entry.
pub async fn run(
    core: Arc<Core>,
    bucket: kv::Store,
    token: CancellationToken,
    up: Up,
) -> anyhow::Result<()> {
    let count = core.discord.replicas();
    loop {
        match beat(&bucket, &core.instance).await {
            Ok(n) => {
                if count.swap(n, Ordering::Relaxed) != n {
                    tracing::info!(replicas = n, "live room-manager replicas changed");
                }
                up.set(true);
            }
            Err(e) => tracing::warn!(error = %e, "replica heartbeat failed"),
        }
        tokio::select! {
            _ = token.cancelled() => {
                let _ = bucket.delete(&core.instance).await;
                return Ok(());
            }
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
}
