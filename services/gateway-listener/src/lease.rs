//! The shard lease: one replica per shard holds the gateway connection; the others wait.
//!
//! The lease is a JetStream KV entry `shard-<id>-of-<count>.lease` = `{holder, expires_at}`,
//! written only by compare-and-set on the entry's revision. The holder renews it every
//! `lease_renew_ms`; a standby takes it once `expires_at` (wall clock, ms) has passed — within
//! `lease_ttl_ms` + one poll of the holder dying. Beside it, `shard-<id>-of-<count>.checkpoint`
//! holds the session checkpoint (session id, resume URL, acknowledged sequence, voice states),
//! so the new holder resumes the session and classifies the replayed events correctly.
//!
//! **Fencing.** Checkpoint writes are compare-and-set too: a new holder first *claims* the
//! checkpoint (rewrites it under its own name, expecting the revision it read), and from then on
//! every write expects the revision of its own previous write. A replica that lost the lease —
//! paused, cut off from NATS, slow — finds the revision changed and its write refused
//! ([`LeaseError::Lost`]): it can never overwrite the new holder's checkpoint, however late it
//! wakes up.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use voicerooms_contract::now_ms;
use voicerooms_contract::status::{pool_key, ShardLease};

use crate::config::GatewayConfig;
use crate::publisher::Checkpoint;

/// Largest checkpoint written (NATS' default max payload is 1 MiB).
pub const MAX_CHECKPOINT_BYTES: usize = 900 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("another replica holds the lease")]
    Lost,
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
}

pub struct Lease {
    kv: kv::Store,
    key: String,
    checkpoint_key: String,
    instance: String,
    ttl: Duration,
    op_timeout: Duration,
    revision: Option<u64>,
    /// The lease revision when we took it: our fencing token, recorded in the checkpoint.
    token: u64,
    /// The revision of our last checkpoint write (or claim); `None` until claimed.
    checkpoint_revision: Option<u64>,
}

impl Lease {
    /// Opens (creating if needed) the lease bucket and the lease of shard `shard` of `count`.
    pub async fn open(
        js: &jetstream::Context,
        config: &GatewayConfig,
        shard: u32,
        count: u32,
        instance: &str,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let kv =
            voicerooms_platform::nats::ensure_kv(js, &config.lease_bucket, 1, replicas).await?;
        Ok(Self::new(kv, config, shard, count, instance))
    }

    /// The lease of shard `shard` of `count` in an open bucket. Every KV request of the lease but
    /// the checkpoint read is bounded by one renewal interval, so a request lost while the bucket
    /// elects a leader (after a NATS node loss) costs one poll, not the JetStream timeout.
    pub fn new(
        kv: kv::Store,
        config: &GatewayConfig,
        shard: u32,
        count: u32,
        instance: &str,
    ) -> Self {
        Self {
            kv,
            key: pool_key::lease(shard, count),
            checkpoint_key: pool_key::checkpoint(shard, count),
            instance: instance.to_owned(),
            ttl: Duration::from_millis(config.lease_ttl_ms),
            op_timeout: Duration::from_millis(config.lease_renew_ms),
            revision: None,
            token: 0,
            checkpoint_revision: None,
        }
    }

    /// Whether we hold the lease (as of our last successful write).
    pub fn held(&self) -> bool {
        self.revision.is_some()
    }

    /// `request` within `op_timeout`; a timeout is [`LeaseError::Unavailable`].
    async fn bounded<T, E>(
        &self,
        request: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<Result<T, E>, LeaseError> {
        tokio::time::timeout(self.op_timeout, request)
            .await
            .map_err(|_| LeaseError::Unavailable("lease store request timed out".into()))
    }

    /// The pool bucket.
    pub fn store(&self) -> kv::Store {
        self.kv.clone()
    }

    /// How long a written lease lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn value(&self, expires_at: u64) -> Bytes {
        Bytes::from(
            serde_json::to_vec(&ShardLease {
                holder: self.instance.clone(),
                expires_at,
            })
            .unwrap_or_default(),
        )
    }

    /// Takes the lease if it is free, expired or already ours. `Ok(false)`: someone else has it.
    pub async fn try_acquire(&mut self) -> Result<bool, LeaseError> {
        let unavailable = |e: &dyn std::fmt::Display| LeaseError::Unavailable(e.to_string());
        let entry = self
            .bounded(self.kv.entry(self.key.clone()))
            .await?
            .map_err(|e| unavailable(&e))?;
        let value = self.value(
            now_ms().saturating_add(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)),
        );
        // A write that lands after we gave up names us as holder: the next poll takes it as ours.
        let result = match entry {
            None => self
                .bounded(self.kv.create(&self.key, value))
                .await?
                .map_err(|e| e.to_string()),
            Some(entry) => {
                let current: Option<ShardLease> = serde_json::from_slice(&entry.value).ok();
                let free = match &current {
                    Some(v) => v.holder == self.instance || v.expires_at <= now_ms(),
                    None => true,
                };
                if !free {
                    return Ok(false);
                }
                self.bounded(self.kv.update(&self.key, value, entry.revision))
                    .await?
                    .map_err(|e| e.to_string())
            }
        };
        match result {
            Ok(rev) => {
                if self.revision.is_none() {
                    self.token = rev;
                    self.checkpoint_revision = None;
                }
                self.revision = Some(rev);
                Ok(true)
            }
            // Lost the race to another replica.
            Err(e) => {
                tracing::debug!(error = %e, "lease acquisition raced");
                Ok(false)
            }
        }
    }

    /// Extends the lease. `Lost` when another replica has taken it meanwhile.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let Some(rev) = self.revision else {
            return Err(LeaseError::Lost);
        };
        let value = self.value(
            now_ms().saturating_add(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)),
        );
        match self.bounded(self.kv.update(&self.key, value, rev)).await? {
            Ok(rev) => {
                self.revision = Some(rev);
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.revision = None;
                Err(LeaseError::Lost)
            }
            Err(e) => Err(LeaseError::Unavailable(e.to_string())),
        }
    }

    /// Gives the lease up at once (graceful shutdown), so a standby need not wait for the TTL.
    pub async fn release(&mut self) {
        let Some(rev) = self.revision.take() else {
            return;
        };
        let released = self
            .bounded(self.kv.update(&self.key, self.value(0), rev))
            .await;
        if let Err(e) = released.and_then(|r| r.map_err(|e| LeaseError::Unavailable(e.to_string())))
        {
            tracing::warn!(error = %e, "could not release the lease; it expires by itself");
        }
    }

    /// Takes over the shard's checkpoint: reads it and writes it back under our name, expecting
    /// the revision read, so that from now on only we can write it (see the module's fencing
    /// note). Returns the previous holder's checkpoint, if any. Call after [`Lease::try_acquire`].
    /// The read is not bounded by `op_timeout`: losing it means identifying instead of resuming.
    pub async fn claim_checkpoint(&mut self) -> Result<Option<Checkpoint>, LeaseError> {
        let unavailable = |e: &dyn std::fmt::Display| LeaseError::Unavailable(e.to_string());
        for _ in 0..CLAIM_ATTEMPTS {
            if self.revision.is_none() {
                return Err(LeaseError::Lost);
            }
            let entry = self
                .kv
                .entry(self.checkpoint_key.clone())
                .await
                .map_err(|e| unavailable(&e))?;
            let (previous, expected) = match &entry {
                Some(e) if !e.value.is_empty() => {
                    match serde_json::from_slice::<Checkpoint>(&e.value) {
                        Ok(c) => (Some(c), Some(e.revision)),
                        Err(err) => {
                            tracing::warn!(error = %err, "ignoring an unreadable session checkpoint");
                            (None, Some(e.revision))
                        }
                    }
                }
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            let mut claim = previous.clone().unwrap_or_else(|| Checkpoint {
                session: None,
                seq: 0,
                voice: Vec::new(),
                at: now_ms(),
                stream_seq: 0,
                holder: String::new(),
                token: 0,
            });
            claim.holder = self.instance.clone();
            claim.token = self.token;
            let bytes = self.encode(&claim)?;
            let written = match expected {
                Some(rev) => self
                    .bounded(self.kv.update(&self.checkpoint_key, bytes, rev))
                    .await?
                    .map_err(|e| e.to_string()),
                None => self
                    .bounded(self.kv.create(&self.checkpoint_key, bytes))
                    .await?
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(rev) => {
                    self.checkpoint_revision = Some(rev);
                    return Ok(previous);
                }
                // Written meanwhile (the previous holder's last write): read it again.
                Err(e) => tracing::debug!(error = %e, "checkpoint claim raced; reading again"),
            }
        }
        Err(LeaseError::Unavailable(
            "the checkpoint kept changing while we claimed it".into(),
        ))
    }

    /// The stored checkpoint, read only (diagnostics, tests).
    pub async fn load_checkpoint(&self) -> Option<Checkpoint> {
        match self.kv.get(self.checkpoint_key.clone()).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
            _ => None,
        }
    }

    fn encode(&self, checkpoint: &Checkpoint) -> Result<Bytes, LeaseError> {
        let bytes =
            serde_json::to_vec(checkpoint).map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        if bytes.len() > MAX_CHECKPOINT_BYTES {
            return Err(LeaseError::Unavailable(format!(
                "checkpoint of {} bytes exceeds {MAX_CHECKPOINT_BYTES}",
                bytes.len()
            )));
        }
        Ok(Bytes::from(bytes))
    }

    /// Writes our checkpoint, expecting the revision of our previous write: `Lost` when another
    /// replica has claimed it since (we are fenced off and must stop).
    pub async fn save_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), LeaseError> {
        let Some(rev) = self.checkpoint_revision else {
            return Err(LeaseError::Lost);
        };
        let mut checkpoint = checkpoint.clone();
        checkpoint.holder = self.instance.clone();
        checkpoint.token = self.token;
        let bytes = self.encode(&checkpoint)?;
        match self
            .bounded(self.kv.update(&self.checkpoint_key, bytes, rev))
            .await?
        {
            Ok(rev) => {
                self.checkpoint_revision = Some(rev);
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.checkpoint_revision = None;
                tracing::error!(
                    "checkpoint write refused: another replica has taken the shard over (fenced)"
                );
                Err(LeaseError::Lost)
            }
            Err(e) => Err(LeaseError::Unavailable(e.to_string())),
        }
    }
}

/// Rounds of read-and-claim before giving up (each one lost to a concurrent write).
const CLAIM_ATTEMPTS: usize = 10;
