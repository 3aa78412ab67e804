//! The shard pool: N identical replicas share M shards, balanced, with handover and failover.
//!
//! Every replica runs the same configuration. Each one, every `lease_renew_ms` (a *tick*):
//! 1. writes itself into `pool.members` (one KV entry, compare-and-set): its expiry
//!    (`now + lease_ttl_ms`), the shards it holds and its target. Entries past their expiry are
//!    dropped by whoever writes next: a replica killed with -9 leaves the pool within
//!    `lease_ttl_ms`.
//! 2. reads every shard's lease (`shard-<id>-of-<M>.lease`): who holds what.
//! 3. computes the balance ([`plan`]): the live members sorted by shards held (most first) and
//!    name; the first `M mod N` get `ceil(M/N)` shards, the others `floor(M/N)`. Sorting by what
//!    they hold keeps shards where they are: only the surplus moves.
//! 4. claims free shards (no lease, or an expired one) while it holds fewer than its target, and
//!    hands over the shards above its target.
//!
//! A **claim** is the lease's compare-and-set, then the takeover of [`crate::takeover`]: claim the
//! checkpoint, read what the stream holds after it, resume (or identify and converge). A
//! **handover** stops the shard's connection (close 4000: the session stays resumable), lets the
//! publisher drain, writes the final checkpoint (exact: everything stored, nothing more) and
//! releases the lease; a replica below its target claims it at its next tick and resumes the
//! session where the old holder stopped. Nothing is read twice or skipped: the old holder stops
//! reading before its last checkpoint, the new one resumes from that checkpoint's sequence, and
//! anything in between comes out under the same de-duplication ids.
//!
//! **Failover.** A replica that dies stops renewing: its leases expire after `lease_ttl_ms` and
//! its member entry with them; the others' targets grow and they claim its shards, resuming each
//! from its checkpoint plus the stream.
//!
//! Replicas read the same entries, so they agree on the balance up to one tick; a claim that
//! races another is lost by one of them (compare-and-set) and the loser tries again later.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use voicerooms_contract::now_ms;
use voicerooms_contract::status::{pool_key, PoolMember, PoolMembers, ShardLease};

use crate::config::ShardCount;
use crate::identify::IdentifyQueue;

/// What a replica sees of the pool at one tick.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Shards in the pool.
    pub count: u32,
    /// Live members, this replica included.
    pub members: BTreeSet<String>,
    /// Shard → holder of its live lease (this replica's own leases included).
    pub holders: BTreeMap<u32, String>,
    /// Shards this replica runs or is claiming.
    pub mine: BTreeSet<u32>,
}

/// What a replica does at one tick.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Shards this replica should hold.
    pub target: u32,
    /// Free shards to claim.
    pub claim: Vec<u32>,
    /// Shards to hand over.
    pub release: Vec<u32>,
}

/// The balance seen from `me` (see the module docs).
pub fn plan(me: &str, view: &View) -> Plan {
    let mut members = view.members.clone();
    members.insert(me.to_owned());
    let n = u32::try_from(members.len()).unwrap_or(u32::MAX).max(1);
    let held = |m: &str| -> usize {
        if m == me {
            view.mine.len()
        } else {
            view.holders.values().filter(|h| h.as_str() == m).count()
        }
    };
    let mut order: Vec<(usize, &String)> = members.iter().map(|m| (held(m), m)).collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let base = view.count.checked_div(n).unwrap_or(0);
    let extra = view.count.checked_rem(n).unwrap_or(0);
    let position = order
        .iter()
        .position(|(_, m)| m.as_str() == me)
        .unwrap_or(0);
    let target = if u32::try_from(position).unwrap_or(u32::MAX) < extra {
        base.saturating_add(1)
    } else {
        base
    };
    let target_len = usize::try_from(target).unwrap_or(usize::MAX);
    let mut out = Plan {
        target,
        ..Plan::default()
    };
    if view.mine.len() > target_len {
        let surplus = view.mine.len().saturating_sub(target_len);
        out.release = view.mine.iter().rev().take(surplus).copied().collect();
    } else {
        let want = target_len.saturating_sub(view.mine.len());
        // Start at a place of our own, so replicas claiming at once try different shards first.
        let start = u32::try_from(
            me.bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
                .checked_rem(u64::from(view.count.max(1)))
                .unwrap_or(0),
        )
        .unwrap_or(0);
        out.claim = (0..view.count)
            .map(|i| {
                start
                    .wrapping_add(i)
                    .checked_rem(view.count.max(1))
                    .unwrap_or(0)
            })
            .filter(|s| !view.holders.contains_key(s) && !view.mine.contains(s))
            .take(want)
            .collect();
    }
    out
}

/// The pool's KV entries: members, leases, the pinned shard count.
#[derive(Clone)]
pub struct PoolStore {
    kv: kv::Store,
    instance: String,
    ttl: Duration,
    op_timeout: Duration,
}

impl PoolStore {
    pub fn new(kv: kv::Store, instance: &str, ttl: Duration, op_timeout: Duration) -> Self {
        Self {
            kv,
            instance: instance.to_owned(),
            ttl,
            op_timeout,
        }
    }

    async fn bounded<T, E: std::fmt::Display>(
        &self,
        request: impl std::future::Future<Output = Result<T, E>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.op_timeout, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
            Err(_) => Err(anyhow::anyhow!("pool store request timed out")),
        }
    }

    /// Writes us into `pool.members` (or, with `leaving`, out of it) and returns the live
    /// members. Compare-and-set, retried a few times against concurrent writers.
    pub async fn heartbeat(
        &self,
        count: u32,
        held: &BTreeSet<u32>,
        target: u32,
        leaving: bool,
    ) -> anyhow::Result<BTreeSet<String>> {
        for _ in 0..MEMBERS_ATTEMPTS {
            let entry = self.bounded(self.kv.entry(pool_key::MEMBERS)).await?;
            let (mut members, revision) = match &entry {
                Some(e) => (
                    serde_json::from_slice::<PoolMembers>(&e.value).unwrap_or_default(),
                    Some(e.revision),
                ),
                None => (PoolMembers::default(), None),
            };
            let now = now_ms();
            members
                .members
                .retain(|name, m| m.expires_at > now || *name == self.instance);
            if leaving {
                members.members.remove(&self.instance);
            } else {
                let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
                members.members.insert(
                    self.instance.clone(),
                    PoolMember {
                        expires_at: now.saturating_add(ttl),
                        shard_count: count,
                        held: held.iter().copied().collect(),
                        target,
                    },
                );
            }
            let value = Bytes::from(serde_json::to_vec(&members)?);
            let written = match revision {
                Some(rev) => self
                    .bounded(self.kv.update(pool_key::MEMBERS, value, rev))
                    .await
                    .map(|_| ()),
                None => self
                    .bounded(self.kv.create(pool_key::MEMBERS, value))
                    .await
                    .map(|_| ()),
            };
            match written {
                // Replicas running another shard count are another pool (a resharding rollout).
                Ok(()) => {
                    return Ok(members
                        .members
                        .into_iter()
                        .filter(|(_, m)| m.shard_count == count)
                        .map(|(name, _)| name)
                        .collect())
                }
                Err(e) => tracing::debug!(error = %e, "pool members write raced; reading again"),
            }
        }
        Err(anyhow::anyhow!(
            "pool.members kept changing while we wrote it"
        ))
    }

    /// Shard → holder of every live lease of a pool of `count`.
    pub async fn holders(&self, count: u32) -> anyhow::Result<BTreeMap<u32, String>> {
        let now = now_ms();
        let mut out = BTreeMap::new();
        for shard in 0..count {
            let Some(bytes) = self
                .bounded(self.kv.get(pool_key::lease(shard, count)))
                .await?
            else {
                continue;
            };
            if let Ok(lease) = serde_json::from_slice::<ShardLease>(&bytes) {
                if lease.expires_at > now && !lease.holder.is_empty() {
                    out.insert(shard, lease.holder);
                }
            }
        }
        Ok(out)
    }

    /// The pool's shard count: a configured number, or (`"auto"`) the count pinned in the
    /// bucket, else Discord's recommendation, pinned for every later replica.
    pub async fn shard_count(
        &self,
        configured: ShardCount,
        identify: &IdentifyQueue,
    ) -> anyhow::Result<u32> {
        let pinned = self
            .bounded(self.kv.get(pool_key::SHARD_COUNT))
            .await?
            .and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse::<u32>().ok())
            .filter(|n| *n > 0);
        match configured {
            ShardCount::Fixed(n) => {
                if pinned != Some(n) {
                    if let Some(p) = pinned {
                        tracing::warn!(
                            pinned = p,
                            configured = n,
                            "gateway.shard_count differs from the pool's pinned count; running the configured one (see the runbook's resharding procedure)"
                        );
                    }
                    self.bounded(
                        self.kv
                            .put(pool_key::SHARD_COUNT, Bytes::from(n.to_string())),
                    )
                    .await?;
                }
                Ok(n)
            }
            ShardCount::Auto => {
                let bot = identify.gateway_bot().await?;
                let recommended = bot.shards.max(1);
                if let Some(p) = pinned {
                    if recommended > p {
                        tracing::warn!(
                            pinned = p,
                            recommended,
                            "Discord recommends more shards than the pool runs; reshard (see the runbook)"
                        );
                    }
                    return Ok(p);
                }
                match self
                    .bounded(
                        self.kv
                            .create(pool_key::SHARD_COUNT, Bytes::from(recommended.to_string())),
                    )
                    .await
                {
                    Ok(_) => {
                        tracing::info!(
                            shards = recommended,
                            "pinned Discord's recommended shard count"
                        );
                        Ok(recommended)
                    }
                    // Another replica pinned it first: use that.
                    Err(_) => self
                        .bounded(self.kv.get(pool_key::SHARD_COUNT))
                        .await?
                        .and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse::<u32>().ok())
                        .filter(|n| *n > 0)
                        .ok_or_else(|| anyhow::anyhow!("pool.shard_count unreadable")),
                }
            }
        }
    }
}

/// Rounds of read-and-write of `pool.members` per tick.
const MEMBERS_ATTEMPTS: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn view(count: u32, members: &[&str], holders: &[(u32, &str)], mine: &[u32]) -> View {
        View {
            count,
            members: members.iter().map(|m| (*m).to_owned()).collect(),
            holders: holders.iter().map(|(s, h)| (*s, (*h).to_owned())).collect(),
            mine: mine.iter().copied().collect(),
        }
    }

    #[test]
    fn a_lone_replica_claims_every_shard() {
        let p = plan("a", &view(8, &["a"], &[], &[]));
        assert_eq!(p.target, 8);
        assert_eq!(p.claim.len(), 8);
        assert!(p.release.is_empty());
    }

    #[test]
    fn eight_shards_over_three_replicas_are_three_three_two() {
        let holders = [
            (0, "a"),
            (1, "a"),
            (2, "a"),
            (3, "b"),
            (4, "b"),
            (5, "b"),
            (6, "c"),
            (7, "c"),
        ];
        let a = plan("a", &view(8, &["a", "b", "c"], &holders, &[0, 1, 2]));
        let c = plan("c", &view(8, &["a", "b", "c"], &holders, &[6, 7]));
        assert_eq!((a.target, c.target), (3, 2));
        assert!(
            a.claim.is_empty()
                && a.release.is_empty()
                && c.claim.is_empty()
                && c.release.is_empty()
        );
    }

    #[test]
    fn a_fourth_replica_takes_the_surplus_and_nothing_else_moves() {
        let holders = [
            (0, "a"),
            (1, "a"),
            (2, "a"),
            (3, "b"),
            (4, "b"),
            (5, "b"),
            (6, "c"),
            (7, "c"),
        ];
        let members = ["a", "b", "c", "d"];
        let a = plan("a", &view(8, &members, &holders, &[0, 1, 2]));
        let b = plan("b", &view(8, &members, &holders, &[3, 4, 5]));
        let c = plan("c", &view(8, &members, &holders, &[6, 7]));
        assert_eq!(a.release, vec![2]);
        assert_eq!(b.release, vec![5]);
        assert!(c.release.is_empty() && c.claim.is_empty());
        // Once released, d claims both.
        let after = [(0, "a"), (1, "a"), (3, "b"), (4, "b"), (6, "c"), (7, "c")];
        let d = plan("d", &view(8, &members, &after, &[]));
        assert_eq!(d.target, 2);
        let mut claim = d.claim.clone();
        claim.sort();
        assert_eq!(claim, vec![2, 5]);
    }

    #[test]
    fn the_shards_of_a_dead_replica_go_to_the_others() {
        // a is gone (its leases expired); while its member entry lives, c already fills up to 3.
        let holders = [(3, "b"), (4, "b"), (5, "b"), (6, "c"), (7, "c")];
        let c = plan("c", &view(8, &["a", "b", "c"], &holders, &[6, 7]));
        assert_eq!(c.target, 3);
        assert_eq!(c.claim.len(), 1);
        // Once its entry expired too: four each.
        let b = plan("b", &view(8, &["b", "c"], &holders, &[3, 4, 5]));
        assert_eq!(b.target, 4);
        assert_eq!(b.claim.len(), 1);
        assert!(b.claim.iter().all(|s| *s <= 2));
    }

    #[test]
    fn more_replicas_than_shards_leave_some_idle() {
        let p = plan("b", &view(1, &["a", "b"], &[(0, "a")], &[]));
        assert_eq!(p.target, 0);
        let a = plan("a", &view(1, &["a", "b"], &[(0, "a")], &[0]));
        assert_eq!(a.target, 1);
        assert!(a.release.is_empty());
    }

    #[test]
    fn targets_always_add_up_to_the_shard_count() {
        for count in 0..20u32 {
            for n in 1..7usize {
                let members: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
                let refs: Vec<&str> = members.iter().map(String::as_str).collect();
                let total: u32 = refs
                    .iter()
                    .map(|m| plan(m, &view(count, &refs, &[], &[])).target)
                    .sum();
                assert_eq!(total, count, "{count} shards over {n}");
            }
        }
    }
}
