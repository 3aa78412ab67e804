//! The replica registry: each replica notes itself in one entry (`room_manager/replicas`, a map
//! of instance → live until) every second by compare-and-set and counts the live ones, so the
//! Discord client can take its share of the bot's rate limits (one bucket request held back per
//! other replica, the global limit divided). A replica that stops gracefully removes itself; a
//! crashed one expires after a few seconds and is dropped from the map a minute later.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::{now_ms, ApiError, Millis};

use crate::rooms::Core;
use crate::store::{self, Change};
use crate::supervisor::Up;

/// The key of the registry in the `room_manager` bucket.
pub const KEY: &str = "replicas";
/// How often a replica beats.
const BEAT: Duration = Duration::from_secs(1);
/// How long a beat counts.
const TTL_MS: u64 = 5_000;
/// Entries expired this long ago are removed (crashed replicas' leftovers).
const FORGET_MS: u64 = 60_000;
/// Most replicas the registry holds (a bound on the entry's size).
const MAX_REPLICAS: usize = 256;

type Registry = BTreeMap<String, Millis>;

/// Notes `instance` as live (or removes it) and returns the number of live replicas (≥ 1).
pub async fn beat(state: &kv::Store, instance: &str, alive: bool) -> Result<u32, ApiError> {
    let (live, _) = store::update::<Registry, u32, ApiError, _>(state, KEY, |cur| {
        let now = now_ms();
        let mut reg = cur.unwrap_or_default();
        reg.retain(|_, until| now.saturating_sub(*until) <= FORGET_MS);
        if alive {
            if reg.len() >= MAX_REPLICAS && !reg.contains_key(instance) {
                // Full of live-looking entries: keep counting, do not grow.
                let live = reg.values().filter(|u| **u > now).count();
                return Ok(Change::Keep(u32::try_from(live).unwrap_or(u32::MAX)));
            }
            reg.insert(instance.to_owned(), now.saturating_add(TTL_MS));
        } else {
            reg.remove(instance);
        }
        let live = reg.values().filter(|u| **u > now).count();
        Ok(Change::Put(reg, u32::try_from(live).unwrap_or(u32::MAX)))
    })
    .await??;
    Ok(live.max(1))
}

/// Beats every second until shutdown, then removes this replica.
pub async fn run(core: Arc<Core>, token: CancellationToken, up: Up) -> anyhow::Result<()> {
    let count = core.discord.replicas();
    loop {
        match beat(&core.state, &core.instance, true).await {
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
                let _ = beat(&core.state, &core.instance, false).await;
                return Ok(());
            }
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
}
