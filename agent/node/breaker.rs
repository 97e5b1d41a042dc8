//! A circuit breaker for one node's RPC: closed while calls succeed, open
//! after `threshold` consecutive failures. While open, polls become half-open
//! probes spaced by jittered exponential backoff; one success closes it.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
}

/// What a recorded result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Opened,
    Closed,
}

pub struct Breaker {
    threshold: u32,
    failures: u32,
    state: State,
    poll_interval: Duration,
    backoff_max: Duration,
    backoff: ExponentialBackoff,
}

impl Breaker {
    pub fn new(threshold: u32, poll_interval: Duration, backoff_max: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            failures: 0,
            state: State::Closed,
            poll_interval,
            backoff_max,
            backoff: Self::fresh_backoff(poll_interval, backoff_max),
        }
    }

    /// New limits from a reloaded config; the open/closed state and the
    /// failure count carry over.
    pub fn retune(&mut self, threshold: u32, poll_interval: Duration, backoff_max: Duration) {
        self.threshold = threshold.max(1);
        self.poll_interval = poll_interval;
        self.backoff_max = backoff_max;
        self.backoff = Self::fresh_backoff(poll_interval, backoff_max);
    }

    fn fresh_backoff(min: Duration, max: Duration) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_jitter()
            .with_factor(2.0)
            .with_min_delay(min)
            .with_max_delay(max.max(min))
            .without_max_times()
            .build()
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Records a success; returns the delay before the next poll.
    pub fn success(&mut self) -> (Transition, Duration) {
        let was = self.state;
        self.failures = 0;
        self.state = State::Closed;
        self.backoff = Self::fresh_backoff(self.poll_interval, self.backoff_max);
        let t = if was == State::Open {
            Transition::Closed
        } else {
            Transition::None
        };
        (t, self.poll_interval)
    }

    /// Records a failure; returns the delay before the next poll (a probe
    /// when the breaker is open).
    pub fn failure(&mut self) -> (Transition, Duration) {
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff.next().unwrap_or(self.backoff_max);
        if self.state == State::Closed && self.failures >= self.threshold {
            self.state = State::Open;
            return (Transition::Opened, delay);
        }
        (Transition::None, delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_closes_on_success() {
        let mut b = Breaker::new(3, Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(b.failure().0, Transition::None);
        assert_eq!(b.failure().0, Transition::None);
        assert_eq!(b.failure().0, Transition::Opened);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.failure().0, Transition::None, "opens once");
        let (t, d) = b.success();
        assert_eq!(t, Transition::Closed);
        assert_eq!(d, Duration::from_millis(100));
        assert_eq!(b.success().0, Transition::None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Breaker::new(1, Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..10).map(|_| b.failure().1).collect();
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(2)),
            "{delays:?}"
        );
        assert!(delays[6] > delays[0], "{delays:?}");
    }
}
