//! Latency recording with hdrhistogram, summarised per reporting interval.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::proto::LatencySummary;

/// A shared microsecond histogram. Cloning shares the same histogram.
#[derive(Clone)]
pub struct Latency {
    hist: Arc<Mutex<Histogram<u64>>>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // 1 µs to 10 min at 3 significant digits: about 50 KiB.
        let hist = Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds are valid");
        Latency {
            hist: Arc::new(Mutex::new(hist)),
        }
    }

    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        if let Ok(mut h) = self.hist.lock() {
            let _ = h.record(us);
        }
    }

    /// Quantiles since the last call, then starts a new interval.
    pub fn take_summary(&self) -> LatencySummary {
        let Ok(mut h) = self.hist.lock() else {
            return LatencySummary::default();
        };
        let s = summarize(&h);
        h.reset();
        s
    }
}

fn summarize(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        count: h.len(),
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_quantiles_and_resets() {
        let l = Latency::new();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.take_summary();
        assert_eq!(s.count, 100);
        assert!((49_000..=51_000).contains(&s.p50_us), "{s:?}");
        assert!((99_000..=100_100).contains(&s.p99_us), "{s:?}");
        assert_eq!(l.take_summary().count, 0);
    }
}
