//! Latency recording with hdrhistogram, summarised per reporting interval.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::proto::{LatencySummary, MethodLatency};

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
        self.record_n(d, 1);
    }

    /// Records `n` samples of `d` each.
    pub fn record_n(&self, d: Duration, n: u64) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        if let Ok(mut h) = self.hist.lock() {
            let _ = h.record_n(us, n);
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

/// The histograms an agent summarises into each status report.
#[derive(Clone, Default)]
pub struct Timings {
    pub rpc: RpcTimings,
    /// Validation time per header.
    pub validate: Latency,
    /// A batch sent to the aggregator until its acknowledgement.
    pub round_trip: Latency,
}

/// RPC latency and failures per method. Cloning shares the same record.
#[derive(Clone, Default)]
pub struct RpcTimings {
    methods: Arc<Mutex<BTreeMap<String, MethodStats>>>,
}

struct MethodStats {
    hist: Histogram<u64>,
    errors: u64,
}

/// One interval of RPC calls: all methods together, and each on its own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RpcInterval {
    pub all: LatencySummary,
    pub errors: u64,
    pub methods: Vec<MethodLatency>,
}

impl RpcTimings {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one call; `failed` counts it as an error.
    pub fn record(&self, method: &str, d: Duration, failed: bool) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        let Ok(mut m) = self.methods.lock() else {
            return;
        };
        if !m.contains_key(method) {
            // Two significant digits (1 %) keep a method's histogram near 3 KiB.
            let Ok(hist) = Histogram::new_with_bounds(1, 600_000_000, 2) else {
                return;
            };
            m.insert(method.to_string(), MethodStats { hist, errors: 0 });
        }
        if let Some(s) = m.get_mut(method) {
            let _ = s.hist.record(us);
            s.errors += u64::from(failed);
        }
    }

    /// Quantiles and errors since the last call, then starts a new interval.
    pub fn take(&self) -> RpcInterval {
        let Ok(mut m) = self.methods.lock() else {
            return RpcInterval::default();
        };
        let mut out = RpcInterval::default();
        let mut all: Option<Histogram<u64>> = None;
        for (name, s) in m.iter_mut() {
            if s.hist.is_empty() {
                continue;
            }
            out.errors += s.errors;
            out.methods.push(MethodLatency {
                method: name.clone(),
                latency: Some(summarize(&s.hist)),
                errors: s.errors,
            });
            match &mut all {
                Some(a) => {
                    let _ = a.add(&s.hist);
                }
                None => all = Some(s.hist.clone()),
            }
            s.hist.reset();
            s.errors = 0;
        }
        out.all = all.as_ref().map(summarize).unwrap_or_default();
        out
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

    #[test]
    fn rpc_timings_summarise_each_method_and_all_together() {
        let t = RpcTimings::new();
        for ms in 1..=10 {
            t.record("eth_blockNumber", Duration::from_millis(ms), false);
        }
        t.record("eth_getBlockByNumber", Duration::from_secs(3), true);
        let i = t.take();
        assert_eq!(i.all.count, 11);
        assert_eq!(i.errors, 1);
        assert!(i.all.max_us >= 2_990_000, "{i:?}");
        let names: Vec<&str> = i.methods.iter().map(|m| m.method.as_str()).collect();
        assert_eq!(names, ["eth_blockNumber", "eth_getBlockByNumber"]);
        assert_eq!(i.methods[1].errors, 1);
        assert!(i.methods[0].latency.unwrap().p99_us <= 10_100, "{i:?}");
        // A new interval starts empty.
        assert_eq!(t.take(), RpcInterval::default());
    }
}
