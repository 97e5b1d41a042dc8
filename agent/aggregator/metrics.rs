//! Prometheus `/metrics` for the aggregator, with prometheus-client.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::proto::NodeStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    network: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabels {
    network: String,
    node: String,
    quantile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    role: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperatorLabels {
    operator: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    network: String,
    kind: String,
}

pub struct Metrics {
    registry: Registry,
    head: Family<NodeLabels, Gauge>,
    lag: Family<NodeLabels, Gauge>,
    peers: Family<NodeLabels, Gauge>,
    connected: Family<NodeLabels, Gauge>,
    outbox: Family<NodeLabels, Gauge>,
    outbox_quota: Family<NodeLabels, Gauge>,
    rpc_latency: Family<QuantileLabels, Gauge<f64, AtomicU64>>,
    findings_open: Family<KindLabels, Gauge>,
    open_kinds: Mutex<BTreeMap<(String, &'static str), i64>>,
    events: Family<NodeLabels, Counter>,
    duplicates: Family<NodeLabels, Counter>,
    agents_connected: Gauge,
    refused: Family<ReasonLabels, Counter>,
    missing: Family<NodeLabels, Counter>,
    cert_expiry: Family<CertLabels, Gauge>,
    query_refused: Family<OperatorLabels, Counter>,
    evaluation: Histogram,
    /// What each node's per-second gauges were last set to: an evaluation
    /// writes only those that changed (at thousands of nodes, setting
    /// every series each second cost half as much again as judging them).
    shown: Mutex<HashMap<String, Shown>>,
}

/// A node's gauges as last set.
#[derive(Default)]
struct Shown {
    network: String,
    head: Option<u64>,
    lag: Option<u64>,
    connected: Option<bool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(&Default::default())
    }
}

impl Metrics {
    /// The registry, with `labels` on every series (`metrics.labels`).
    pub fn new(labels: &BTreeMap<String, String>) -> Self {
        let (head, lag, peers) = (Family::default(), Family::default(), Family::default());
        let (connected, outbox, outbox_quota) =
            (Family::default(), Family::default(), Family::default());
        let rpc_latency = Family::<QuantileLabels, Gauge<f64, AtomicU64>>::default();
        let findings_open = Family::default();
        let (events, duplicates) = (Family::default(), Family::default());
        let agents_connected = Gauge::default();
        let (refused, missing) = (Family::default(), Family::default());
        let cert_expiry = Family::<CertLabels, Gauge>::default();
        let query_refused = Family::<OperatorLabels, Counter>::default();
        // 0.1 ms to about 3 s.
        let evaluation = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        let mut registry = Registry::with_prefix_and_labels(
            "outpost",
            labels
                .iter()
                .map(|(k, v)| (k.clone().into(), v.clone().into())),
        );
        registry.register(
            "node_head_height",
            "Head height each node reports",
            head.clone(),
        );
        registry.register(
            "node_lag_blocks",
            "Blocks behind its network's fleet head",
            lag.clone(),
        );
        registry.register("node_peers", "Peers each node reports", peers.clone());
        registry.register(
            "node_connected",
            "1 while the node's agent has a stream open to this aggregator, 0 after it closed",
            connected.clone(),
        );
        registry.register(
            "node_outbox_bytes",
            "Bytes in the agent's outbox at its last status",
            outbox.clone(),
        );
        registry.register(
            "node_outbox_quota_bytes",
            "The agent's outbox quota (store.outbox_quota_bytes) at its last status",
            outbox_quota.clone(),
        );
        registry.register(
            "node_rpc_latency_seconds",
            "Agent-measured node RPC latency over the last status interval",
            rpc_latency.clone(),
        );
        registry.register(
            "findings_open",
            "Open findings by network and kind",
            findings_open.clone(),
        );
        registry.register("ingest_events", "Events stored per node", events.clone());
        registry.register(
            "ingest_duplicates",
            "Re-sent events recognised and ignored",
            duplicates.clone(),
        );
        registry.register(
            "agents_connected",
            "Agents with an open stream",
            agents_connected.clone(),
        );
        registry.register(
            "ingest_refused",
            "Streams and messages refused at a limit or a check, by reason",
            refused.clone(),
        );
        registry.register(
            "ingest_missing_events",
            "Seqs that never arrived and no gap event covered (seq-gap findings)",
            missing.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each certificate in use stops being valid (Unix time): the aggregator's own, its CA, and every client's seen",
            cert_expiry.clone(),
        );
        registry.register(
            "query_refused",
            "Query API calls refused over limits.query_per_second, by operator identity",
            query_refused.clone(),
        );
        registry.register(
            "fleet_evaluation_duration_seconds",
            "The fleet's once-a-second evaluation (silence, lag, divergence of every node); ingest waits for it",
            evaluation.clone(),
        );
        Metrics {
            registry,
            head,
            lag,
            peers,
            connected,
            outbox,
            outbox_quota,
            rpc_latency,
            findings_open,
            open_kinds: Mutex::new(BTreeMap::new()),
            events,
            duplicates,
            agents_connected,
            refused,
            missing,
            cert_expiry,
            query_refused,
            evaluation,
            shown: Mutex::default(),
        }
    }
}

fn labels(network: &str, node: &str) -> NodeLabels {
    NodeLabels {
        network: network.into(),
        node: node.into(),
    }
}

impl Metrics {
    /// A stream or message refused; `reason` is one of a few fixed words.
    pub fn refused(&self, reason: &'static str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// One evaluation of the fleet took `took`.
    pub fn evaluation(&self, took: std::time::Duration) {
        self.evaluation.observe(took.as_secs_f64());
    }

    /// A query call of `operator` refused over its rate limit.
    pub fn query_refused(&self, operator: &str) {
        self.query_refused
            .get_or_create(&OperatorLabels {
                operator: operator.into(),
            })
            .inc();
    }

    /// `role` is aggregator, ca, agent or operator.
    pub fn cert_expiry(&self, role: &str, name: &str, not_after_s: i64) {
        self.cert_expiry
            .get_or_create(&CertLabels {
                role: role.into(),
                name: name.into(),
            })
            .set(not_after_s);
    }

    pub fn missing(&self, network: &str, node: &str, events: u64) {
        self.missing
            .get_or_create(&labels(network, node))
            .inc_by(events);
    }

    pub fn head(&self, network: &str, node: &str, height: u64) {
        if self.show(network, node, |s| &mut s.head, height) {
            self.head
                .get_or_create(&labels(network, node))
                .set(height as i64);
        }
    }

    pub fn lag(&self, network: &str, node: &str, blocks: u64) {
        if self.show(network, node, |s| &mut s.lag, blocks) {
            self.lag
                .get_or_create(&labels(network, node))
                .set(blocks as i64);
        }
    }

    /// Whether `node`'s head or connection differ from what its gauges
    /// show, without writing them.
    pub fn node_changed(&self, network: &str, node: &str, height: u64, connected: bool) -> bool {
        let shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        shown.get(node).is_none_or(|s| {
            s.network != network || s.head != Some(height) || s.connected != Some(connected)
        })
    }

    /// Records `value` as one of `node`'s gauges; false when it already was.
    fn show<T: PartialEq>(
        &self,
        network: &str,
        node: &str,
        field: impl Fn(&mut Shown) -> &mut Option<T>,
        value: T,
    ) -> bool {
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        let s = match shown.get_mut(node) {
            Some(s) => s,
            None => shown.entry(node.to_string()).or_default(),
        };
        if s.network != network {
            *s = Shown {
                network: network.to_string(),
                ..Default::default()
            };
        }
        let slot = field(s);
        if slot.as_ref() == Some(&value) {
            return false;
        }
        *slot = Some(value);
        true
    }

    pub fn node_status(&self, network: &str, node: &str, s: &NodeStatus) {
        if s.outbox_quota_bytes > 0 {
            let l = labels(network, node);
            self.outbox.get_or_create(&l).set(s.outbox_bytes as i64);
            self.outbox_quota
                .get_or_create(&l)
                .set(s.outbox_quota_bytes as i64);
        }
        if let Some(p) = s.peers {
            self.peers
                .get_or_create(&labels(network, node))
                .set(p as i64);
        }
        if let Some(l) = &s.rpc_latency {
            if l.count > 0 {
                for (q, us) in [("0.5", l.p50_us), ("0.9", l.p90_us), ("0.99", l.p99_us)] {
                    self.rpc_latency
                        .get_or_create(&QuantileLabels {
                            network: network.into(),
                            node: node.into(),
                            quantile: q.into(),
                        })
                        .set(us as f64 / 1e6);
                }
            }
        }
    }

    /// Sets the open-findings gauges; kinds no longer open drop to zero.
    pub fn findings_open(&self, open: &BTreeMap<(String, &'static str), i64>) {
        let mut prev = self.open_kinds.lock().unwrap_or_else(|p| p.into_inner());
        for key in prev.keys() {
            if !open.contains_key(key) {
                self.findings_open
                    .get_or_create(&KindLabels {
                        network: key.0.clone(),
                        kind: key.1.into(),
                    })
                    .set(0);
            }
        }
        for ((network, kind), n) in open {
            self.findings_open
                .get_or_create(&KindLabels {
                    network: network.clone(),
                    kind: (*kind).into(),
                })
                .set(*n);
        }
        *prev = open.clone();
    }

    pub fn counted(&self, node: &str, network: &str, stored: usize, duplicates: usize) {
        let l = labels(network, node);
        self.events.get_or_create(&l).inc_by(stored as u64);
        self.duplicates.get_or_create(&l).inc_by(duplicates as u64);
    }

    pub fn connected(&self, delta: i64) {
        self.agents_connected.inc_by(delta);
    }

    /// Whether `node`'s agent has a stream open, for every node the fleet
    /// knows (also those loaded from the store that never came back).
    pub fn node_connected(&self, network: &str, node: &str, connected: bool) {
        if self.show(network, node, |s| &mut s.connected, connected) {
            self.connected
                .get_or_create(&labels(network, node))
                .set(i64::from(connected));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn exported_names() -> BTreeSet<String> {
        let m = Metrics::default();
        m.head("devnet", "n1", 7);
        m.lag("devnet", "n1", 0);
        m.node_status(
            "devnet",
            "n1",
            &NodeStatus {
                peers: Some(3),
                rpc_latency: Some(crate::proto::LatencySummary {
                    count: 1,
                    p50_us: 1000,
                    p90_us: 2000,
                    p99_us: 3000,
                    max_us: 4000,
                }),
                outbox_bytes: 10,
                outbox_quota_bytes: 100,
                ..Default::default()
            },
        );
        m.cert_expiry("agent", "n1", 1_900_000_000);
        m.findings_open(&BTreeMap::from([(("devnet".to_string(), "stall"), 1)]));
        m.counted("n1", "devnet", 5, 1);
        m.connected(1);
        m.node_connected("devnet", "n1", true);
        m.query_refused("alice");
        m.evaluation(std::time::Duration::from_millis(3));
        m.encode()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn a_gauge_is_written_when_its_value_changes_and_moves_with_its_network() {
        let m = Metrics::default();
        assert!(m.node_changed("devnet", "n1", 7, true), "never shown");
        m.head("devnet", "n1", 7);
        m.node_connected("devnet", "n1", true);
        assert!(!m.node_changed("devnet", "n1", 7, true));
        assert!(m.node_changed("devnet", "n1", 8, true));
        assert!(m.node_changed("devnet", "n1", 7, false));
        assert!(m.node_changed("other", "n1", 7, true));
        m.head("devnet", "n1", 7);
        m.head("devnet", "n1", 9);
        let text = m.encode();
        assert!(
            text.contains("outpost_node_head_height{network=\"devnet\",node=\"n1\"} 9"),
            "{text}"
        );
        // A node that moved to another network gets its gauges there.
        m.head("other", "n1", 9);
        let text = m.encode();
        assert!(
            text.contains("outpost_node_head_height{network=\"other\",node=\"n1\"} 9"),
            "{text}"
        );
    }

    #[test]
    fn exports_the_documented_series() {
        let names = exported_names();
        for want in [
            "outpost_node_head_height",
            "outpost_node_lag_blocks",
            "outpost_node_peers",
            "outpost_node_rpc_latency_seconds",
            "outpost_findings_open",
            "outpost_ingest_events_total",
            "outpost_ingest_duplicates_total",
            "outpost_agents_connected",
            "outpost_node_connected",
            "outpost_node_outbox_bytes",
            "outpost_node_outbox_quota_bytes",
            "outpost_certificate_expiry_timestamp_seconds",
            "outpost_query_refused_total",
            "outpost_fleet_evaluation_duration_seconds_sum",
        ] {
            assert!(names.contains(want), "{want} missing from {names:?}");
        }
    }

    /// The `outpost_` series named in a PromQL expression.
    fn series_in(expr: &str) -> Vec<String> {
        let mut found = Vec::new();
        let mut rest = expr;
        while let Some(i) = rest.find("outpost_") {
            let token: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + token.len()..];
            found.push(token);
        }
        found
    }

    /// The shipped Prometheus rules query only series the aggregator
    /// exports (promtool tests them on series of the same names).
    #[test]
    fn prometheus_rules_use_exported_series() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/prometheus/outpost-rules.yml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let names = exported_names();
        let exprs: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .collect();
        assert!(exprs.len() >= 6, "{exprs:?}");
        for expr in exprs {
            for token in series_in(expr) {
                assert!(
                    names.contains(&token),
                    "a rule queries {token}, which is not exported"
                );
            }
        }
    }

    /// The shipped Grafana dashboard queries only series the aggregator exports.
    #[test]
    fn grafana_dashboard_uses_exported_series() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/grafana/outpost-fleet.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
        let names = exported_names();
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(t["expr"].as_str().unwrap_or("").to_string());
            }
        }
        assert!(exprs.len() >= 8, "{exprs:?}");
        for expr in exprs {
            for token in series_in(&expr) {
                assert!(
                    names.contains(&token),
                    "dashboard queries {token}, which is not exported"
                );
            }
        }
    }

    #[test]
    fn configured_labels_are_on_every_series() {
        let labels = [("aggregator".to_string(), "agg-eu-1".to_string())].into();
        let m = Metrics::new(&labels);
        m.head("devnet", "n1", 7);
        m.connected(1);
        m.node_connected("devnet", "n1", true);
        let text = m.encode();
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with("outpost_")).collect();
        assert!(!series.is_empty());
        for l in series {
            assert!(l.contains("aggregator=\"agg-eu-1\""), "{l}");
        }
        assert!(text.contains("outpost_node_head_height{"), "{text}");
    }
}
