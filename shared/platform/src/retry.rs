//! Retrying with exponential backoff and jitter: one policy type for every retry loop.
//!
//! A [`Backoff`] is a policy: the delay before retry `n` (1-based) is `base × 2^(n-1)`, capped at
//! `max`, optionally randomised ([`Jitter`]) so that many clients failing together do not retry
//! together, and optionally limited to a number of attempts. All arithmetic saturates: a policy
//! built from configuration cannot overflow, however large its numbers or however many failures.
//!
//! Three ways to use it, from the simplest:
//! - [`retry`]: run an async operation until it succeeds, the error is not worth retrying, the
//!   attempts run out or a cancellation token fires. Logs each retry with the operation's name.
//! - [`Schedule`] (from [`Backoff::schedule`]): a failure counter for loops that do more than
//!   retry one call (a gateway reconnect loop, a publish pipeline): `next_delay()` after a
//!   failure, `reset()` after a success.
//! - [`Backoff::delay`] / [`Backoff::nominal_delay`]: the delay for a given failure count, where
//!   the caller keeps the count itself.
//!
//! Sleeping uses `tokio::time`, so tests drive it with `tokio::time::pause()`.
//!
//! ```
//! use std::time::Duration;
//! use voicerooms_platform::retry::{Backoff, Jitter};
//!
//! // Discord's gateway reconnect: 1, 2, 4, 8, 16 s, then 16 s for ever.
//! let gateway = Backoff::new(Duration::from_secs(1), Duration::from_secs(16));
//! let secs: Vec<u64> = (1..=6).map(|n| gateway.delay(n).as_secs()).collect();
//! assert_eq!(secs, [1, 2, 4, 8, 16, 16]);
//! // The same with equal jitter: each delay in [d/2, d].
//! let jittered = gateway.with_jitter(Jitter::Equal);
//! assert!(jittered.delay(3) >= Duration::from_secs(2) && jittered.delay(3) <= Duration::from_secs(4));
//! ```

use std::fmt;
use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// How a delay is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Exactly the nominal delay (deterministic: specs that name their delays, tests).
    #[default]
    None,
    /// Uniform in `[0, d]`: spreads a crowd of retriers best (AWS's "full jitter").
    Full,
    /// Uniform in `[d/2, d]`: spreads them while keeping at least half the wait.
    Equal,
}

/// An exponential backoff policy: `base × 2^(n-1)` before retry `n`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
    /// Calls in all, the first included; `None`: no limit.
    max_attempts: Option<u32>,
}

impl Backoff {
    /// Doubling from `base` up to `max` (raised to `base` if smaller), no jitter, no attempt
    /// limit. A zero `base` retries without waiting.
    pub const fn new(base: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < base.as_nanos() {
            base
        } else {
            max
        };
        Self {
            base,
            max,
            jitter: Jitter::None,
            max_attempts: None,
        }
    }

    /// [`Backoff::new`] from milliseconds, as settings carry them.
    pub const fn from_millis(base_ms: u64, max_ms: u64) -> Self {
        Self::new(
            Duration::from_millis(base_ms),
            Duration::from_millis(max_ms),
        )
    }

    /// The same policy with `jitter`.
    #[must_use]
    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The same policy giving up after `attempts` calls in all (the first one included; 0 and 1
    /// both mean "never retry").
    #[must_use]
    pub const fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    pub const fn base(&self) -> Duration {
        self.base
    }
    pub const fn max(&self) -> Duration {
        self.max
    }
    pub const fn jitter(&self) -> Jitter {
        self.jitter
    }
    pub const fn max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// Whether retry number `retry` (1-based: the call after `retry` failures) is allowed.
    pub fn allows(&self, retry: u32) -> bool {
        self.max_attempts
            .is_none_or(|attempts| retry < attempts.max(1))
    }

    /// The delay before retry `retry` without jitter: 0 for `retry == 0` (nothing failed yet),
    /// then `base × 2^(retry-1)` capped at `max`.
    pub fn nominal_delay(&self, retry: u32) -> Duration {
        let Some(exponent) = retry.checked_sub(1) else {
            return Duration::ZERO;
        };
        match 1u32.checked_shl(exponent) {
            Some(factor) => self.base.saturating_mul(factor).min(self.max),
            None => self.max,
        }
    }

    /// The delay before retry `retry` with this policy's jitter (from the thread's RNG).
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, &mut rand::rng())
    }

    /// [`Backoff::delay`] from a given random source (seeded tests).
    pub fn delay_with<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let nominal = self.nominal_delay(retry);
        match self.jitter {
            Jitter::None => nominal,
            Jitter::Full => uniform(rng, Duration::ZERO, nominal),
            Jitter::Equal => {
                let half = nominal.checked_div(2).unwrap_or_default();
                uniform(rng, half, nominal)
            }
        }
    }

    /// A fresh failure counter following this policy.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            policy: *self,
            failures: 0,
        }
    }
}

/// Uniform in `[low, high]` at nanosecond resolution (delays above ~584 years saturate).
fn uniform<R: Rng + ?Sized>(rng: &mut R, low: Duration, high: Duration) -> Duration {
    let low_ns = u64::try_from(low.as_nanos()).unwrap_or(u64::MAX);
    let high_ns = u64::try_from(high.as_nanos()).unwrap_or(u64::MAX);
    if high_ns <= low_ns {
        return high;
    }
    Duration::from_nanos(rng.random_range(low_ns..=high_ns))
}

/// Consecutive failures under a [`Backoff`] policy, for loops that keep their own state.
#[derive(Debug, Clone)]
pub struct Schedule {
    policy: Backoff,
    failures: u32,
}

impl Schedule {
    /// Records a failure and returns how long to wait before the next attempt, or `None` when
    /// the policy's attempts are used up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        self.policy
            .allows(self.failures)
            .then(|| self.policy.delay(self.failures))
    }

    /// After a success: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success (or the start).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn policy(&self) -> &Backoff {
        &self.policy
    }
}

/// What [`retry`] does with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Retry after the policy's delay.
    Retry,
    /// Retry after exactly this long (a server said so); the caller bounds it. Counts as an
    /// attempt.
    RetryAfter(Duration),
    /// Give up: retrying cannot help (bad input, permission denied, ...).
    Stop,
}

/// A classifier that retries every error.
pub fn always<E>(_: &E) -> Decision {
    Decision::Retry
}

/// Why [`retry`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    /// The classifier said retrying cannot help.
    #[error("{0}")]
    Permanent(E),
    /// The policy's attempts were used up; `last` is the final error.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: E },
    /// The cancellation token fired (shutdown) before a success.
    #[error("cancelled")]
    Cancelled,
}

impl<E> RetryError<E> {
    /// The operation's last error, if it got one.
    pub fn into_last(self) -> Option<E> {
        match self {
            RetryError::Permanent(e) | RetryError::Exhausted { last: e, .. } => Some(e),
            RetryError::Cancelled => None,
        }
    }
}

/// Runs `op` until it succeeds, `classify` says [`Decision::Stop`], the policy's attempts run out,
/// or `cancel` fires (checked before every attempt and during every wait; an attempt in progress
/// is not interrupted: wrap `op` in a timeout where a call can hang). Each retry is logged at
/// `warn` with `operation`, the attempt number, the delay and the error.
pub async fn retry<T, E, F, Fut, C>(
    operation: &str,
    policy: &Backoff,
    cancel: &CancellationToken,
    mut classify: C,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    C: FnMut(&E) -> Decision,
    E: fmt::Display,
{
    let mut schedule = policy.schedule();
    loop {
        if cancel.is_cancelled() {
            return Err(RetryError::Cancelled);
        }
        let error = match op().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let decision = classify(&error);
        let delay = match (decision, schedule.next_delay()) {
            (Decision::Stop, _) => return Err(RetryError::Permanent(error)),
            (_, None) => {
                return Err(RetryError::Exhausted {
                    attempts: schedule.failures(),
                    last: error,
                })
            }
            (Decision::RetryAfter(after), Some(_)) => after,
            (Decision::Retry, Some(delay)) => delay,
        };
        tracing::warn!(
            operation,
            attempt = schedule.failures(),
            retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %error,
            "{operation} failed; retrying"
        );
        tokio::select! {
            _ = cancel.cancelled() => return Err(RetryError::Cancelled),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use rand::SeedableRng;
    use tokio::time::Instant;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_from_the_base_and_stay_at_the_cap() {
        let gateway = Backoff::new(Duration::from_secs(1), Duration::from_secs(16));
        let secs: Vec<u64> = (0..8).map(|n| gateway.delay(n).as_secs()).collect();
        assert_eq!(secs, [0, 1, 2, 4, 8, 16, 16, 16]);
    }

    #[test]
    fn huge_numbers_saturate_instead_of_overflowing() {
        let p = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(p.delay(1), Duration::MAX);
        assert_eq!(p.delay(u32::MAX), Duration::MAX);
        let p = Backoff::from_millis(u64::MAX, u64::MAX).with_jitter(Jitter::Full);
        for n in [1, 2, 31, 32, 33, 64, u32::MAX] {
            assert!(p.delay(n) <= p.max());
        }
        let p = Backoff::from_millis(3, 1_000_000);
        assert_eq!(p.nominal_delay(32), Duration::from_secs(1_000));
        assert_eq!(p.nominal_delay(u32::MAX), Duration::from_secs(1_000));
    }

    #[test]
    fn a_cap_below_the_base_is_raised_to_the_base() {
        let p = Backoff::from_millis(500, 100);
        assert_eq!(p.max(), Duration::from_millis(500));
        assert_eq!(p.delay(3), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_within_its_range_and_varies() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let full = Backoff::from_millis(100, 10_000).with_jitter(Jitter::Full);
        let equal = full.with_jitter(Jitter::Equal);
        for n in 1..12 {
            let nominal = full.nominal_delay(n);
            let samples: Vec<Duration> = (0..200).map(|_| full.delay_with(n, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d <= nominal));
            assert!(
                samples.iter().any(|d| *d < nominal / 2),
                "full jitter reaches below d/2"
            );
            let samples: Vec<Duration> = (0..200).map(|_| equal.delay_with(n, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d >= nominal / 2 && *d <= nominal));
            let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
            assert!(distinct.len() > 100, "equal jitter spreads the delays");
        }
    }

    #[test]
    fn a_schedule_counts_failures_resets_and_runs_out() {
        let mut s = Backoff::from_millis(10, 1_000)
            .with_max_attempts(4)
            .schedule();
        assert_eq!(s.next_delay(), Some(10 * MS));
        assert_eq!(s.next_delay(), Some(20 * MS));
        s.reset();
        assert_eq!(s.failures(), 0);
        assert_eq!(s.next_delay(), Some(10 * MS));
        assert_eq!(s.next_delay(), Some(20 * MS));
        assert_eq!(s.next_delay(), Some(40 * MS));
        assert_eq!(
            s.next_delay(),
            None,
            "4 attempts = the first call and 3 retries"
        );
        assert_eq!(s.failures(), 4);
        let mut never = Backoff::from_millis(10, 10).with_max_attempts(0).schedule();
        assert_eq!(never.next_delay(), None);
    }

    /// An operation failing its first `failures` calls, counting calls.
    fn flaky(
        failures: u32,
    ) -> (
        Arc<AtomicU32>,
        impl FnMut() -> std::future::Ready<Result<u32, String>>,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let op = move || {
            let n = counter.fetch_add(1, Ordering::SeqCst).saturating_add(1);
            std::future::ready(if n <= failures {
                Err(format!("failure {n}"))
            } else {
                Ok(n)
            })
        };
        (calls, op)
    }

    #[tokio::test(start_paused = true)]
    async fn retry_waits_the_policys_delays_then_succeeds() {
        let policy = Backoff::from_millis(100, 250);
        let (calls, op) = flaky(3);
        let start = Instant::now();
        let result = retry("test op", &policy, &CancellationToken::new(), always, op).await;
        assert_eq!(result.unwrap(), 4);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // 100 + 200 + 250 (capped), on the paused clock.
        assert_eq!(start.elapsed(), 550 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_gives_up_after_the_attempts_with_the_last_error() {
        let policy = Backoff::from_millis(10, 10).with_max_attempts(3);
        let (calls, op) = flaky(u32::MAX);
        let result = retry("test op", &policy, &CancellationToken::new(), always, op).await;
        match result {
            Err(RetryError::Exhausted { attempts, last }) => {
                assert_eq!(attempts, 3);
                assert_eq!(last, "failure 3");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_not_retried() {
        let policy = Backoff::from_millis(10, 10);
        let (calls, op) = flaky(u32::MAX);
        let start = Instant::now();
        let result = retry(
            "test op",
            &policy,
            &CancellationToken::new(),
            |_: &String| Decision::Stop,
            op,
        )
        .await;
        assert!(matches!(result, Err(RetryError::Permanent(e)) if e == "failure 1"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_given_delay_replaces_the_backoff() {
        let policy = Backoff::from_millis(10, 10);
        let (_, op) = flaky(2);
        let start = Instant::now();
        let result = retry(
            "test op",
            &policy,
            &CancellationToken::new(),
            |_: &String| Decision::RetryAfter(Duration::from_secs(3)),
            op,
        )
        .await;
        assert_eq!(result.unwrap(), 3);
        assert_eq!(start.elapsed(), Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_the_wait_at_once() {
        let policy = Backoff::from_millis(60_000, 60_000);
        let cancel = CancellationToken::new();
        let (calls, op) = flaky(u32::MAX);
        let stopper = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stopper.cancel();
        });
        let start = Instant::now();
        let result = retry("test op", &policy, &cancel, always, op).await;
        assert!(matches!(result, Err(RetryError::Cancelled)), "{result:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Already cancelled: not even one call.
        let (calls, op) = flaky(0);
        let result = retry("test op", &policy, &cancel, always, op).await;
        assert!(matches!(result, Err(RetryError::Cancelled)));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
