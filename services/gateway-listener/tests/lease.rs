//! The shard lease and its checkpoint against a real nats-server: who may write.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects,
    clippy::unreachable
)]

mod support;

use std::time::Duration;

use gateway_listener::lease::Lease;
use gateway_listener::publisher::{Checkpoint, SessionInfo};
use support::fast_gateway;
use voicerooms_testkit::NatsServer;

fn checkpoint(seq: u64) -> Checkpoint {
    Checkpoint {
        session: Some(SessionInfo {
            session_id: "s1".into(),
            resume_url: "ws://127.0.0.1:1".into(),
        }),
        seq,
        voice: vec![],
        at: 0,
        stream_seq: 0,
        holder: String::new(),
        token: 0,
    }
}

/// Defect 3 of issue 15: the checkpoint write was an unconditional put, so a replica that had
/// lost the lease (paused, cut off) could overwrite the new holder's checkpoint.
#[tokio::test]
async fn a_holder_that_lost_its_lease_cannot_overwrite_the_new_holders_checkpoint() {
    // Arrange: A holds the shard and checkpoints seq 5.
    let nats = NatsServer::start().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let config = fast_gateway();
    let mut a = Lease::open(&js, &config, 0, 1, "gw-a", 1)
        .await
        .expect("lease a");
    let mut b = Lease::open(&js, &config, 0, 1, "gw-b", 1)
        .await
        .expect("lease b");
    assert!(a.try_acquire().await.expect("a acquires"));
    assert_eq!(a.claim_checkpoint().await.expect("a claims"), None);
    a.save_checkpoint(&checkpoint(5))
        .await
        .expect("a checkpoints");

    // Act: A stops renewing (paused); B takes the lease once it expires, loads the checkpoint
    // and moves on to seq 9; then A wakes up and writes the checkpoint it had.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !b.try_acquire().await.unwrap_or(false) {
        assert!(
            std::time::Instant::now() < deadline,
            "b takes the expired lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loaded = b.claim_checkpoint().await.expect("b claims the checkpoint");
    assert_eq!(loaded.map(|c| c.seq), Some(5));
    b.save_checkpoint(&checkpoint(9))
        .await
        .expect("b checkpoints");
    let stale = a.save_checkpoint(&checkpoint(6)).await;

    // Assert: A's write is refused; B's checkpoint stands.
    assert!(stale.is_err(), "the old holder's write was accepted");
    let stored = b.load_checkpoint().await.expect("a checkpoint");
    assert_eq!((stored.seq, stored.holder.as_str()), (9, "gw-b"));
    b.save_checkpoint(&checkpoint(10))
        .await
        .expect("the holder keeps writing");
}
