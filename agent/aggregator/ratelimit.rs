//! Query rate limits: a token bucket per operator identity (governor's keyed
//! limiter, GCRA), `limits.query_per_second` refilling up to
//! `limits.query_burst`. A call over the limit is refused with
//! ResourceExhausted and how long to wait; the first refusal of a burst is
//! written to the audit log, the rest are only counted, until the operator
//! is admitted again. A `Watch` stream counts once, when it opens.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

use super::auth::AUDIT;
use crate::config::LimitsConfig;

/// Why a call was refused, and whether it opened a refused burst.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub wait: Duration,
    /// The first refusal since this operator was last admitted.
    pub opens_burst: bool,
}

/// One token bucket per operator name, on clock `C`.
type Buckets<C> =
    RateLimiter<String, HashMapStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

pub struct QueryLimits<C: Clock = DefaultClock> {
    limiter: Option<Buckets<C>>,
    per_second: u32,
    burst: u32,
    /// Refusals in each operator's current refused burst.
    refusing: Mutex<HashMap<String, u64>>,
}

impl QueryLimits<DefaultClock> {
    pub fn new(cfg: &LimitsConfig) -> QueryLimits<DefaultClock> {
        QueryLimits::with_clock(cfg, DefaultClock::default())
    }
}

impl<C: Clock> QueryLimits<C> {
    /// `limits.query_per_second = 0` turns the limit off.
    pub fn with_clock(cfg: &LimitsConfig, clock: C) -> QueryLimits<C> {
        let limiter = NonZeroU32::new(cfg.query_per_second).map(|rate| {
            let burst = NonZeroU32::new(cfg.query_burst).unwrap_or(rate);
            RateLimiter::hashmap_with_clock(Quota::per_second(rate).allow_burst(burst), clock)
        });
        QueryLimits {
            limiter,
            per_second: cfg.query_per_second,
            burst: cfg.query_burst,
            refusing: Mutex::default(),
        }
    }

    /// Takes one token of `operator`'s bucket, or says how long until one.
    pub fn check(&self, operator: &str) -> Result<(), Refusal> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let mut refusing = self.refusing.lock().unwrap_or_else(|p| p.into_inner());
        let key = operator.to_string();
        match limiter.check_key(&key) {
            Ok(()) => {
                if let Some(refused) = refusing.remove(operator) {
                    tracing::info!(target: AUDIT, caller = %operator, refused, "queries admitted again after a refused burst");
                }
                Ok(())
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(limiter.clock().now());
                let count = refusing.entry(key).or_insert(0);
                *count += 1;
                Err(Refusal {
                    wait,
                    opens_burst: *count == 1,
                })
            }
        }
    }

    /// `check` as the query API answers it: the audit line at the start of
    /// a refused burst, and the status the caller gets.
    pub fn admit(&self, operator: &str, method: &str) -> Result<(), tonic::Status> {
        let refusal = match self.check(operator) {
            Ok(()) => return Ok(()),
            Err(r) => r,
        };
        let wait_ms = refusal.wait.as_millis().max(1) as u64;
        if refusal.opens_burst {
            tracing::warn!(
                target: AUDIT,
                caller = %operator,
                method,
                retry_after_ms = wait_ms,
                per_second = self.per_second,
                burst = self.burst,
                "query refused: over the rate limit (later refusals of this burst are counted, not logged)"
            );
        }
        let mut status = tonic::Status::resource_exhausted(format!(
            "query rate limit for {operator} reached ({} a second, bursts of {}); retry in {wait_ms} ms",
            self.per_second, self.burst
        ));
        if let Ok(v) = wait_ms.to_string().parse() {
            status.metadata_mut().insert("retry-after-ms", v);
        }
        Err(status)
    }

    /// Forgets the buckets that are full again, so that state is kept only
    /// for operators who queried lately.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limits(per_second: u32, burst: u32) -> (QueryLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let cfg = LimitsConfig {
            query_per_second: per_second,
            query_burst: burst,
            ..Default::default()
        };
        (QueryLimits::with_clock(&cfg, clock.clone()), clock)
    }

    #[test]
    fn a_burst_is_admitted_then_refused_with_the_wait_then_refilled() {
        let (l, clock) = limits(2, 3);
        for _ in 0..3 {
            assert_eq!(l.check("alice"), Ok(()));
        }
        let first = l.check("alice").unwrap_err();
        assert!(first.opens_burst);
        assert_eq!(first.wait, Duration::from_millis(500));
        let second = l.check("alice").unwrap_err();
        assert!(!second.opens_burst, "one audit line per burst");
        // Another operator has a bucket of its own.
        assert_eq!(l.check("bob"), Ok(()));
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.check("alice"), Ok(()));
        assert!(l.check("alice").unwrap_err().opens_burst, "a new burst");
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let (l, _) = limits(0, 0);
        for _ in 0..10_000 {
            assert_eq!(l.check("alice"), Ok(()));
        }
    }

    #[test]
    fn the_refusal_says_how_long_to_wait() {
        let (l, _) = limits(1, 1);
        l.admit("alice", "ListNodes").unwrap();
        let s = l.admit("alice", "ListNodes").unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("retry in 1000 ms"), "{}", s.message());
        assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "1000");
    }
}
