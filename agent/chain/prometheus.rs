//! Any node that exposes its state as Prometheus metrics. `source.url` is
//! the node's (or its exporter's) metrics endpoint; `[source.metrics]` says
//! which series holds the height, peers, mempool and sync state. A scrape
//! carries no block hashes, so this source gives heights only: stall, lag,
//! peer, sync and height-regression checks work, hash linkage and fork
//! detection do not.
//!
//! ```toml
//! [source.metrics]
//! height = "drachma_blocks"
//! peers = "drachma_peers_count"
//! mempool = 'drachma_mempool_transactions{pool="main"}'
//! syncing = "drachma_initial_block_download"   # non-zero while catching up
//! network = "drachma_chain_info{network}"      # the label holding the network id
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_parse::{Sample, Scrape, Value};
use serde::{Deserialize, Serialize};

use super::rpc::JsonRpcClient;
use super::{ChainSource, SourceError, SourceFuture};
use crate::model::{now_unix_ms, Hash, Header, HeaderRef, NodeStatus};

/// Which series feeds which field. Each is a metric name, optionally with
/// label matchers (`name{label="value",...}`); `network` names one label.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricMap {
    pub height: String,
    #[serde(default)]
    pub peers: Option<String>,
    #[serde(default)]
    pub mempool: Option<String>,
    #[serde(default)]
    pub syncing: Option<String>,
    #[serde(default)]
    pub network: Option<String>,
}

impl MetricMap {
    /// Every selector that does not parse, as `(key, why)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (key, sel) in [
            ("source.metrics.height", Some(&self.height)),
            ("source.metrics.peers", self.peers.as_ref()),
            ("source.metrics.mempool", self.mempool.as_ref()),
            ("source.metrics.syncing", self.syncing.as_ref()),
        ] {
            if let Some(Err(e)) = sel.map(|s| Selector::parse(s)) {
                out.push((key, e));
            }
        }
        if let Some(Err(e)) = self.network.as_deref().map(LabelSelector::parse) {
            out.push(("source.metrics.network", e));
        }
        out
    }
}

/// `name` or `name{label="value",...}`: the first sample of `name` whose
/// labels include all of these.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    name: String,
    labels: Vec<(String, String)>,
}

fn metric_name(s: &str, whole: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{whole:?}: {s:?} is not a metric name"))
    }
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let s = s.trim();
        let Some((name, rest)) = s.split_once('{') else {
            return Ok(Selector {
                name: metric_name(s, s)?,
                labels: Vec::new(),
            });
        };
        let inner = rest
            .strip_suffix('}')
            .ok_or_else(|| format!("{s:?}: the label list does not end with }}"))?;
        let mut labels = Vec::new();
        for m in inner.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            let (k, v) = m
                .split_once('=')
                .ok_or_else(|| format!("{s:?}: {m:?} is not label=\"value\""))?;
            let v = v
                .trim()
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .ok_or_else(|| format!("{s:?}: the value of {k:?} is not in double quotes"))?;
            labels.push((metric_name(k.trim(), s)?, v.to_string()));
        }
        Ok(Selector {
            name: metric_name(name.trim(), s)?,
            labels,
        })
    }

    /// The error for a scrape without the selected series.
    fn absent(&self) -> SourceError {
        SourceError::Malformed(format!("metric {} is not in the scrape", self.name))
    }

    fn find<'a>(&self, scrape: &'a Scrape) -> Option<&'a Sample> {
        scrape.samples.iter().find(|x| {
            x.metric == self.name
                && self
                    .labels
                    .iter()
                    .all(|(k, v)| x.labels.get(k) == Some(v.as_str()))
        })
    }

    /// The selected sample's value, if the scrape has it.
    pub fn value(&self, scrape: &Scrape) -> Result<Option<f64>, SourceError> {
        let Some(sample) = self.find(scrape) else {
            return Ok(None);
        };
        match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) if v.is_finite() => Ok(Some(v)),
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Err(SourceError::Malformed(
                format!("metric {} is {v}", self.name),
            )),
            _ => Err(SourceError::Malformed(format!(
                "metric {} is a histogram or summary, not a number",
                self.name
            ))),
        }
    }

    /// The selected sample's value as a count (a whole number, not negative).
    pub fn count(&self, scrape: &Scrape) -> Result<Option<u64>, SourceError> {
        match self.value(scrape)? {
            Some(v) if v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(63) => Ok(Some(v as u64)),
            Some(v) => Err(SourceError::Malformed(format!(
                "metric {} is {v}, not a whole number",
                self.name
            ))),
            None => Ok(None),
        }
    }
}

/// `name{label}`: the value of `label` on the first sample of `name`.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSelector {
    /// The series, by name alone.
    series: Selector,
    label: String,
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let s = s.trim();
        let (name, label) = s
            .strip_suffix('}')
            .and_then(|s| s.split_once('{'))
            .ok_or_else(|| format!("{s:?}: expected metric{{label}}"))?;
        Ok(LabelSelector {
            series: Selector {
                name: metric_name(name.trim(), s)?,
                labels: Vec::new(),
            },
            label: metric_name(label.trim(), s)?,
        })
    }
}

pub struct PrometheusSource {
    api: JsonRpcClient,
    height: Selector,
    peers: Option<Selector>,
    mempool: Option<Selector>,
    syncing: Option<Selector>,
    network: Option<LabelSelector>,
    /// The highest height a scrape has shown: the node has every block up
    /// to it, so `header` needs no scrape of its own for those.
    seen: AtomicU64,
}

impl PrometheusSource {
    /// Fails with the first selector that does not parse; configs are
    /// checked before this, so that only happens to callers that skip it.
    pub fn new(api: JsonRpcClient, map: &MetricMap) -> Result<Self, String> {
        let opt = |s: &Option<String>| s.as_deref().map(Selector::parse).transpose();
        Ok(PrometheusSource {
            api,
            height: Selector::parse(&map.height)?,
            peers: opt(&map.peers)?,
            mempool: opt(&map.mempool)?,
            syncing: opt(&map.syncing)?,
            network: map
                .network
                .as_deref()
                .map(LabelSelector::parse)
                .transpose()?,
            seen: AtomicU64::new(0),
        })
    }

    async fn scrape(&self) -> Result<Scrape, SourceError> {
        parse_scrape(&self.api.get_text("scrape").await?)
    }

    async fn height(&self) -> Result<u64, SourceError> {
        let scrape = self.scrape().await?;
        let height = self
            .height
            .count(&scrape)?
            .ok_or_else(|| self.height.absent())?;
        self.seen.fetch_max(height, Ordering::Relaxed);
        Ok(height)
    }
}

/// A scrape has no hashes: headers carry empty ones, which every check that
/// compares hashes treats as equal.
/// A scrape in the text exposition format.
pub fn parse_scrape(text: &str) -> Result<Scrape, SourceError> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| SourceError::Malformed(format!("scrape: {e}")))
}

fn unhashed(height: u64) -> Header {
    Header {
        height,
        hash: Hash(Vec::new()),
        parent_hash: Hash(Vec::new()),
        timestamp: now_unix_ms() / 1000,
        raw: None,
    }
}

impl ChainSource for PrometheusSource {
    fn chain(&self) -> &'static str {
        "prometheus"
    }

    fn has_hashes(&self) -> bool {
        false
    }

    fn head(&self) -> SourceFuture<'_, HeaderRef> {
        Box::pin(async move {
            Ok(HeaderRef {
                height: self.height().await?,
                hash: Hash(Vec::new()),
            })
        })
    }

    /// Any height the node has reached; the time is when this scrape saw it.
    fn header(&self, height: u64) -> SourceFuture<'_, Header> {
        Box::pin(async move {
            if height > self.seen.load(Ordering::Relaxed) && self.height().await? < height {
                return Err(SourceError::NotFound(height));
            }
            Ok(unhashed(height))
        })
    }

    fn status(&self) -> SourceFuture<'_, NodeStatus> {
        Box::pin(async move {
            let scrape = self.scrape().await?;
            let count = |s: &Option<Selector>| match s {
                Some(s) => s.count(&scrape),
                None => Ok(None),
            };
            Ok(NodeStatus {
                peers: count(&self.peers)?,
                mempool: count(&self.mempool)?,
                syncing: match &self.syncing {
                    Some(s) => s.value(&scrape)?.map(|v| v != 0.0),
                    None => None,
                },
                ..Default::default()
            })
        })
    }

    fn network_id(&self) -> SourceFuture<'_, String> {
        Box::pin(async move {
            let Some(sel) = &self.network else {
                return Err(SourceError::Malformed(
                    "source.metrics.network is not set, so the node's network is unknown".into(),
                ));
            };
            let scrape = self.scrape().await?;
            let sample = sel
                .series
                .find(&scrape)
                .ok_or_else(|| sel.series.absent())?;
            sample
                .labels
                .get(&sel.label)
                .map(str::to_string)
                .ok_or_else(|| {
                    SourceError::Malformed(format!(
                        "metric {} has no label {}",
                        sel.series.name, sel.label
                    ))
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    const TEXT: &str = r#"# HELP drachma_blocks Height of the best block.
# TYPE drachma_blocks gauge
drachma_blocks 812345
# TYPE drachma_peers_count gauge
drachma_peers_count{direction="in"} 3
drachma_peers_count{direction="out"} 8
# TYPE drachma_chain_info gauge
drachma_chain_info{network="drachma-main",version="1.2.0"} 1
drachma_fractional 1.5
drachma_negative -2
# TYPE rpc_seconds histogram
rpc_seconds_bucket{le="0.1"} 1
rpc_seconds_bucket{le="+Inf"} 2
rpc_seconds_sum 0.3
rpc_seconds_count 2
"#;

    #[test]
    fn selectors_pick_series_by_name_and_labels() {
        let s = scrape(TEXT);
        let count = |sel: &str| Selector::parse(sel).unwrap().count(&s);
        assert_eq!(count("drachma_blocks"), Ok(Some(812_345)));
        assert_eq!(
            count(r#"drachma_peers_count{direction="out"}"#),
            Ok(Some(8))
        );
        assert_eq!(
            count("drachma_peers_count"),
            Ok(Some(3)),
            "the first series"
        );
        assert_eq!(count(r#"drachma_peers_count{direction="x"}"#), Ok(None));
        assert_eq!(count("absent_metric"), Ok(None));
        assert!(count("drachma_fractional").is_err());
        assert!(count("drachma_negative").is_err());
        let net = LabelSelector::parse("drachma_chain_info{network}").unwrap();
        assert_eq!(net.series.name, "drachma_chain_info");
        assert_eq!(net.label, "network");
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        for bad in [
            "",
            "9lives",
            "has space",
            "m{a=b}",
            r#"m{a="b""#,
            "m{a}",
            r#"m{="b"}"#,
        ] {
            let e = Selector::parse(bad).unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.trim())), "{bad}: {e}");
        }
        assert!(LabelSelector::parse("m").is_err());
        assert!(LabelSelector::parse("m{}").is_err());
        let map = MetricMap {
            height: "ok".into(),
            peers: Some("bad name".into()),
            mempool: None,
            syncing: None,
            network: Some("m".into()),
        };
        let keys: Vec<_> = map.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["source.metrics.peers", "source.metrics.network"]);
    }
}
