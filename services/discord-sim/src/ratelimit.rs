//! REST rate limits as Discord applies them: per-route buckets (keyed by bucket id and the
//! route's major parameter), a global per-second limit, and invalid-request counting.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::config::RateLimitConfig;
use crate::util::{instant_after, unix_secs_f64};

/// Bucket headers sent on every rate-limited route.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketHeaders {
    pub limit: u32,
    pub remaining: u32,
    /// Epoch seconds when the bucket resets.
    pub reset: f64,
    /// Seconds until the bucket resets.
    pub reset_after: f64,
    pub bucket: String,
}

/// The limiter's verdict on one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow(BucketHeaders),
    /// 429. `scope` is `user` (bucket) or `global`.
    Limited {
        scope: &'static str,
        retry_after: f64,
        headers: Option<BucketHeaders>,
    },
    /// Too many invalid requests: answered with 403 until the window passes.
    Banned {
        retry_after: f64,
    },
}

struct Bucket {
    remaining: u32,
    reset_at: Instant,
}

/// Bounded: buckets are dropped once their window has passed (see `prune`).
pub struct RateLimiter {
    cfg: RateLimitConfig,
    buckets: HashMap<(String, u64), Bucket>,
    global_window: Option<(Instant, u32)>,
    invalid: VecDeque<Instant>,
}

/// Most buckets kept before expired ones are pruned.
const MAX_BUCKETS: usize = 10_000;

/// A stable, Discord-looking bucket id for a group of routes.
pub fn bucket_id(group: &str) -> String {
    // FNV-1a, twice with different offsets, for 32 hex characters.
    let mut out = String::with_capacity(32);
    for offset in [0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4] {
        let mut h = offset;
        for b in group.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

impl RateLimiter {
    pub fn new(cfg: RateLimitConfig) -> Self {
        Self {
            cfg,
            buckets: HashMap::new(),
            global_window: None,
            invalid: VecDeque::new(),
        }
    }

    fn route_limit(&self, template: &str) -> (u32, Duration) {
        self.cfg
            .route_overrides
            .get(template)
            .copied()
            .unwrap_or((self.cfg.route_limit, self.cfg.route_window))
    }

    fn invalid_in_window(&mut self, now: Instant) -> usize {
        let window = self.cfg.invalid_request_window;
        while self
            .invalid
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            self.invalid.pop_front();
        }
        self.invalid.len()
    }

    /// Decides on one request to `template` (bucket `group`, major parameter `major`).
    pub fn check(&mut self, template: &str, group: &str, major: u64, global: bool) -> Decision {
        let now = Instant::now();
        if self.invalid_in_window(now) >= self.cfg.invalid_request_limit as usize {
            let retry = self
                .invalid
                .front()
                .map(|t| {
                    instant_after(*t, self.cfg.invalid_request_window)
                        .saturating_duration_since(now)
                })
                .unwrap_or_default();
            return Decision::Banned {
                retry_after: retry.as_secs_f64(),
            };
        }
        let (limit, window) = self.route_limit(template);
        let bucket = bucket_id(group);
        if !self.cfg.enabled {
            return Decision::Allow(BucketHeaders {
                limit,
                remaining: limit,
                reset: unix_secs_f64() + window.as_secs_f64(),
                reset_after: window.as_secs_f64(),
                bucket,
            });
        }
        if global {
            let (start, count) = self.global_window.get_or_insert((now, 0));
            if now.duration_since(*start) >= Duration::from_secs(1) {
                *start = now;
                *count = 0;
            }
            if *count >= self.cfg.global_per_second {
                let retry = Duration::from_secs(1).saturating_sub(now.duration_since(*start));
                return Decision::Limited {
                    scope: "global",
                    retry_after: retry.as_secs_f64(),
                    headers: None,
                };
            }
            *count = count.saturating_add(1);
        }
        if self.buckets.len() >= MAX_BUCKETS {
            self.buckets.retain(|_, b| b.reset_at > now);
            if self.buckets.len() >= MAX_BUCKETS {
                // Still full of live buckets: start over rather than grow without bound.
                self.buckets.clear();
            }
        }
        let b = self
            .buckets
            .entry((bucket.clone(), major))
            .or_insert(Bucket {
                remaining: limit,
                reset_at: instant_after(now, window),
            });
        if now >= b.reset_at {
            b.remaining = limit;
            b.reset_at = instant_after(now, window);
        }
        let reset_after = b.reset_at.saturating_duration_since(now).as_secs_f64();
        let headers = |remaining| BucketHeaders {
            limit,
            remaining,
            reset: unix_secs_f64() + reset_after,
            reset_after,
            bucket: bucket.clone(),
        };
        if b.remaining == 0 {
            return Decision::Limited {
                scope: "user",
                retry_after: reset_after,
                headers: Some(headers(0)),
            };
        }
        b.remaining = b.remaining.saturating_sub(1);
        Decision::Allow(headers(b.remaining))
    }

    /// Counts a response toward the invalid-request limit when it is 401, 403 or a 429 not in
    /// the `shared` scope.
    pub fn record_status(&mut self, status: u16, scope: Option<&str>) {
        let invalid = matches!(status, 401 | 403) || (status == 429 && scope != Some("shared"));
        if invalid {
            let now = Instant::now();
            self.invalid_in_window(now);
            // Bounded: never more entries than the limit (+1 to trip it).
            if self.invalid.len() <= self.cfg.invalid_request_limit as usize {
                self.invalid.push_back(now);
            }
        }
    }

    /// Invalid requests counted in the current window.
    pub fn invalid_count(&mut self) -> usize {
        self.invalid_in_window(Instant::now())
    }

    /// Forgets every bucket and counter.
    pub fn reset(&mut self) {
        self.buckets.clear();
        self.global_window = None;
        self.invalid.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u32, global: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            route_limit: limit,
            route_window: Duration::from_secs(60),
            global_per_second: global,
            ..RateLimitConfig::default()
        })
    }

    #[test]
    fn a_bucket_runs_out_and_answers_with_user_scope() {
        let mut rl = limiter(2, 50);
        assert!(matches!(rl.check("GET /x", "x", 1, true), Decision::Allow(h) if h.remaining == 1));
        assert!(matches!(rl.check("GET /x", "x", 1, true), Decision::Allow(h) if h.remaining == 0));
        assert!(matches!(
            rl.check("GET /x", "x", 1, true),
            Decision::Limited { scope: "user", .. }
        ));
        // Another major parameter has its own bucket.
        assert!(matches!(
            rl.check("GET /x", "x", 2, true),
            Decision::Allow(_)
        ));
    }

    #[test]
    fn the_global_limit_applies_across_routes() {
        let mut rl = limiter(100, 2);
        rl.check("GET /a", "a", 1, true);
        rl.check("GET /b", "b", 1, true);
        assert!(matches!(
            rl.check("GET /c", "c", 1, true),
            Decision::Limited {
                scope: "global",
                ..
            }
        ));
    }

    #[test]
    fn shared_scope_429s_are_not_counted_as_invalid() {
        let mut rl = limiter(1, 50);
        rl.record_status(429, Some("shared"));
        rl.record_status(401, None);
        rl.record_status(200, None);
        assert_eq!(rl.invalid_count(), 1);
    }
}
