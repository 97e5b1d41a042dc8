//! The fleet's truth: per network, which node holds which hash at which
//! height, who lags, whose agent fell silent, and whether the whole network
//! stalled. Every finding gets a verdict (node, network or monitoring path)
//! with its reason, so a broken monitoring path never poses as a node fault.
//!
//! Agent findings arrive with each persisted batch; fleet findings are
//! decided here, on every batch and on a one-second tick.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use super::alert::Alerts;
use super::ingest::Live;
use super::metrics::Metrics;
use crate::config::FleetConfig;
use crate::model::{hex, now_unix_ms};
use crate::proto::{
    self, event::Kind, Finding, FindingKind, FindingState, HashGroup, NodeFinding, Severity,
    Verdict,
};
use crate::store::central::CentralStore;
use crate::store::StoreError;

/// A block hash. The nodes of a network that agree on a height share one
/// copy of its hash (`State::hashes`): a window of 256 heights costs a
/// node about 12 KiB instead of 27 with a copy per node.
type Hash = Arc<[u8]>;

/// One node as the fleet sees it.
#[derive(Default)]
struct NodeView {
    network: String,
    chain: String,
    head: Option<(u64, Vec<u8>)>,
    /// Recent heights and their hashes.
    recent: BTreeMap<u64, Hash>,
    last_advance_ms: i64,
    /// Open agent findings by kind, with the verdicts given to them.
    agent_open: HashMap<i32, Finding>,
    /// Agent stalls whose verdict waits on what the peers do.
    held_stall: bool,
    /// An agent stall that is part of a network stall: the network finding
    /// speaks for it, so it is never alerted on its own.
    stall_covered: bool,
}

impl NodeView {
    fn healthy(&self) -> bool {
        self.agent_open.is_empty()
    }
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, NodeView>,
    /// Open fleet findings by (scope, kind); scope is a node id or `@network`.
    open: HashMap<(String, i32), Finding>,
    /// Per network: when some node first reached each recent height.
    reached: HashMap<String, BTreeMap<u64, i64>>,
    /// Per network: the first hash seen at each recent height, shared with
    /// every node that reports the same one.
    hashes: HashMap<String, BTreeMap<u64, Hash>>,
    /// Divergences seen but not yet open (they must outlast a reorg's churn).
    pending_divergence: HashMap<String, i64>,
    /// Every network taken in, for `fleet.max_networks`.
    networks: BTreeSet<String>,
}

pub struct Fleet {
    state: Mutex<State>,
    store: CentralStore,
    /// Replaced whole by a config reload.
    cfg: RwLock<Arc<FleetConfig>>,
    live: Arc<Live>,
    changes: broadcast::Sender<NodeFinding>,
    alerts: Alerts,
    metrics: Arc<Metrics>,
    /// Agents get `silent_after` from the aggregator's start to reconnect
    /// before their silence counts.
    started_ms: i64,
}

/// A duplicate-agent finding stays open while a second agent was refused
/// this recently (agents retry every few seconds at most).
const DUPLICATE_AGENT_FOR_MS: i64 = 60_000;

/// A disagreement must last this long before it opens: long enough for a
/// reorg to reach every node.
const DIVERGENCE_GRACE_MS: i64 = 2_000;

fn network_scope(network: &str) -> String {
    format!("@{network}")
}

impl Fleet {
    fn cfg(&self) -> Arc<FleetConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A reloaded `[fleet]` table and `[[alert]]` list: thresholds apply
    /// from the next evaluation, alerts from the next finding.
    pub fn reconfigure(&self, cfg: FleetConfig, sinks: &[crate::config::AlertSinkConfig]) {
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
        self.alerts.set_sinks(sinks);
    }

    /// Builds the fleet view from what the store holds.
    pub fn load(
        store: CentralStore,
        cfg: FleetConfig,
        live: Arc<Live>,
        alerts: Alerts,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Fleet>, StoreError> {
        let mut state = State::default();
        let now = now_unix_ms();
        let mut networks = BTreeSet::new();
        for rec in store.nodes()? {
            let mut view = NodeView {
                network: rec.network.clone(),
                chain: rec.chain.clone(),
                last_advance_ms: now,
                ..Default::default()
            };
            if let Some(h) = &rec.head {
                view.head = Some((h.height, h.hash.clone()));
                let from = h.height.saturating_sub(cfg.compare_window);
                let pool = state.hashes.entry(rec.network.clone()).or_default();
                for hdr in store.headers(&rec.node_id, from, h.height)? {
                    view.recent
                        .insert(hdr.height, shared(pool, hdr.height, &hdr.hash));
                }
            }
            for f in store.findings(&rec.node_id)? {
                if f.state() != FindingState::Open {
                    continue;
                }
                if is_fleet_kind(f.kind()) {
                    state.open.insert((rec.node_id.clone(), f.kind), f);
                } else {
                    view.agent_open.insert(f.kind, f);
                }
            }
            networks.insert(rec.network.clone());
            state.nodes.insert(rec.node_id.clone(), view);
        }
        state.networks = networks.clone();
        for net in networks {
            let scope = network_scope(&net);
            for f in store.findings(&scope)? {
                if f.state() == FindingState::Open {
                    state.open.insert((scope.clone(), f.kind), f);
                }
            }
        }
        let (changes, _) = broadcast::channel(1024);
        Ok(Arc::new(Fleet {
            state: Mutex::new(state),
            store,
            cfg: RwLock::new(Arc::new(cfg)),
            live,
            changes,
            alerts,
            metrics,
            started_ms: now,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Findings as they open and resolve.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeFinding> {
        self.changes.subscribe()
    }

    /// Stores a finding change, tells watchers, and alerts when `alert`.
    fn emit(&self, scope: &str, f: &Finding, alert: bool) {
        if let Err(e) = self.store.put_finding(scope, f) {
            tracing::error!("cannot store finding {}: {e}", f.id);
        }
        let node_id = if scope.starts_with('@') {
            String::new()
        } else {
            scope.to_string()
        };
        let nf = NodeFinding {
            node_id,
            finding: Some(f.clone()),
        };
        tracing::info!(
            finding_kind = f.kind().label(),
            finding_id = %f.id,
            network = %f.network,
            verdict = f.verdict().label(),
            state = f.state().label(),
            "{}",
            f.summary
        );
        let _ = self.changes.send(nf.clone());
        if alert {
            self.alerts.notify(&nf);
        }
    }

    /// Whether an agent may report under `network` and `chain`: names that
    /// are safe as keys and labels, a network of `fleet.networks` when it is
    /// set, else at most `fleet.max_networks` distinct networks in all.
    pub fn admit(&self, network: &str, chain: &str) -> Result<(), String> {
        for (what, name) in [("network", network), ("chain", chain)] {
            if !crate::tls::valid_name(name) {
                return Err(format!(
                    "{what} {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
                ));
            }
        }
        let cfg = self.cfg();
        if !cfg.networks.is_empty() {
            return match cfg.networks.iter().any(|n| n == network) {
                true => Ok(()),
                false => Err(format!(
                    "network {network:?} is not one this aggregator serves (fleet.networks: {})",
                    cfg.networks.join(", ")
                )),
            };
        }
        let mut st = self.lock();
        if !st.networks.contains(network) {
            if st.networks.len() >= cfg.max_networks {
                return Err(format!(
                    "this aggregator already serves {} networks, its fleet.max_networks; network {network:?} is refused",
                    st.networks.len()
                ));
            }
            st.networks.insert(network.to_string());
        }
        Ok(())
    }

    /// How long an agent may send nothing before it counts as silent.
    pub fn silent_after(&self) -> Duration {
        self.cfg().silent_after
    }

    /// Events `first..=last` of `node` never arrived and no gap event
    /// covered them: a finding, named after the range, so a re-sent batch
    /// cannot raise it twice.
    pub fn seq_gap(&self, node: &str, network: &str, first: u64, last: u64) {
        let now = now_unix_ms();
        let mut f = new_finding(
            FindingKind::SeqGap,
            Severity::Critical,
            network,
            format!(
                "events {first}..={last} of {node} ({} in all) never reached the aggregator and no gap event covered them",
                last - first + 1
            ),
            Verdict::MonitoringPath,
            "seqs are assigned without holes on the agent, so events were lost between its outbox and this aggregator's store".into(),
            now,
            0,
        );
        f.id = format!("seq-gap-{first}-{last}");
        f.state = FindingState::Occurred as i32;
        f.resolved_at_unix_ms = now;
        self.emit(node, &f, true);
    }

    /// Takes in what one batch of a node brought.
    pub fn on_batch(&self, node: &str, network: &str, chain: &str, events: &[proto::Event]) {
        let now = now_unix_ms();
        let mut emits: Vec<(String, Finding, bool)> = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let window = self.cfg().compare_window;
            // Peers matter only to a finding that opens; finding them costs
            // a pass over the fleet, so only batches that open one pay it.
            let opens_finding = events.iter().any(
                |e| matches!(&e.kind, Some(Kind::Finding(f)) if f.state() == FindingState::Open),
            );
            let peers = if opens_finding {
                st.peers(network, node)
            } else {
                Vec::new()
            };
            let pool = st.hashes.entry(network.to_string()).or_default();
            let view = st.nodes.entry(node.to_string()).or_default();
            view.network = network.to_string();
            view.chain = chain.to_string();
            for e in events {
                match &e.kind {
                    Some(Kind::Header(h)) => {
                        if view.head.as_ref().is_none_or(|(top, _)| h.height > *top) {
                            view.last_advance_ms = now;
                        }
                        view.recent
                            .insert(h.height, shared(pool, h.height, &h.hash));
                        view.head = Some((h.height, h.hash.clone()));
                        st.reached
                            .entry(network.to_string())
                            .or_default()
                            .entry(h.height)
                            .or_insert(now);
                    }
                    Some(Kind::Status(s)) => {
                        if view
                            .head
                            .as_ref()
                            .is_some_and(|(top, _)| s.head_height < *top)
                            && !s.head_hash.is_empty()
                        {
                            view.recent.split_off(&(s.head_height.saturating_add(1)));
                            view.head = Some((s.head_height, s.head_hash.clone()));
                        }
                        self.metrics.node_status(network, node, s);
                    }
                    Some(Kind::Finding(f)) => {
                        let mut f = f.clone();
                        f.network = network.to_string();
                        match f.state() {
                            FindingState::Open => {
                                let (verdict, reason, alert) =
                                    agent_verdict(&f, node, view, &peers);
                                f.verdict = verdict as i32;
                                f.verdict_reason = reason;
                                if f.kind() == FindingKind::Stall {
                                    view.held_stall = !alert;
                                }
                                view.agent_open.insert(f.kind, f.clone());
                                emits.push((node.to_string(), f, alert));
                            }
                            FindingState::Resolved => {
                                let was = view.agent_open.remove(&f.kind);
                                let held = f.kind() == FindingKind::Stall
                                    && (view.held_stall || view.stall_covered);
                                if f.kind() == FindingKind::Stall {
                                    view.held_stall = false;
                                    view.stall_covered = false;
                                }
                                let alerted = was.is_some() && !held;
                                if let Some(w) = was {
                                    f.verdict = w.verdict;
                                    f.verdict_reason = w.verdict_reason;
                                }
                                emits.push((node.to_string(), f, alerted));
                            }
                            _ => {
                                f.verdict = occurred_verdict(f.kind()) as i32;
                                f.verdict_reason = occurred_reason(f.kind()).into();
                                emits.push((node.to_string(), f, true));
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some((top, _)) = view.head {
                view.recent = view.recent.split_off(&top.saturating_sub(window));
            }
            if let Some(reached) = st.reached.get_mut(network) {
                keep_window(reached, window);
            }
            keep_window(pool, window);
        }
        for (scope, f, alert) in emits {
            self.emit(&scope, &f, alert);
        }
        // Cross-node judgement runs on the clock (`run_clock`), so a batch
        // costs the same however large the fleet.
    }

    /// Re-judges every network; called after each batch and every second.
    pub fn evaluate(&self, now: i64) {
        let mut emits: Vec<(String, Finding, bool)> = Vec::new();
        {
            let mut st = self.lock();
            let mut networks: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (node, v) in &st.nodes {
                networks
                    .entry(v.network.clone())
                    .or_default()
                    .push(node.clone());
            }
            for (net, members) in networks {
                self.judge_network(&mut st, &net, &members, now, &mut emits);
            }
        }
        for (scope, f, alert) in emits {
            self.emit(&scope, &f, alert);
        }
        self.update_gauges();
    }

    fn silent(&self, node: &str, now: i64) -> bool {
        let seen = self.live.last_seen_ms(node).max(self.started_ms);
        now - seen > self.cfg().silent_after.as_millis() as i64
    }

    fn judge_network(
        &self,
        st: &mut State,
        net: &str,
        members: &[String],
        now: i64,
        emits: &mut Vec<(String, Finding, bool)>,
    ) {
        let silent: BTreeSet<String> = members
            .iter()
            .filter(|n| self.silent(n, now))
            .cloned()
            .collect();
        let active: Vec<&String> = members.iter().filter(|n| !silent.contains(*n)).collect();

        // Agent silent.
        for node in members {
            let key = (node.clone(), FindingKind::AgentSilent as i32);
            let view = &st.nodes[node];
            if silent.contains(node) && !st.open.contains_key(&key) {
                let seen = self.live.last_seen_ms(node);
                let (verdict, reason) = if view.healthy() {
                    (
                        Verdict::MonitoringPath,
                        "the node's last reports were healthy: the agent or its path to the aggregator failed".to_string(),
                    )
                } else {
                    let kinds: Vec<&str> =
                        view.agent_open.values().map(|f| f.kind().label()).collect();
                    (
                        Verdict::Node,
                        format!("the node's last reports showed {}", kinds.join(", ")),
                    )
                };
                let summary = if seen == 0 {
                    format!("agent {node} has not reported since the aggregator started")
                } else {
                    format!("agent {node} silent for {}s", (now - seen) / 1000)
                };
                let f = new_finding(
                    FindingKind::AgentSilent,
                    Severity::Warning,
                    net,
                    summary,
                    verdict,
                    reason,
                    now,
                    view.head.as_ref().map_or(0, |h| h.0),
                );
                st.open.insert(key, f.clone());
                emits.push((node.clone(), f, true));
            } else if !silent.contains(node) {
                if let Some(f) = st.open.remove(&key) {
                    emits.push((node.clone(), resolved(f, now), true));
                }
            }
        }

        // A second agent with this node id was refused lately; the agent's
        // certificate runs out within a week.
        for node in members {
            let head = st.nodes[node].head.as_ref().map_or(0, |h| h.0);
            let refusal = self
                .live
                .last_refusal(node)
                .filter(|r| now - r.at_ms <= DUPLICATE_AGENT_FOR_MS);
            let duplicate = refusal.map(|r| {
                let addr = |a: Option<std::net::SocketAddr>| a.map_or("-".into(), |a| a.to_string());
                move || {
                    new_finding(
                        FindingKind::DuplicateAgent,
                        Severity::Critical,
                        net,
                        format!(
                            "a second agent (instance {} from {}) tried to stream as {node} while instance {} from {} does; it is refused and keeps its events",
                            r.instance,
                            addr(r.remote),
                            r.owner_instance,
                            addr(r.owner_remote)
                        ),
                        Verdict::MonitoringPath,
                        "two agent processes hold one node's certificate (a cloned host, or an old and a new deployment)".into(),
                        now,
                        head,
                    )
                }
            });
            keep_open(
                &mut st.open,
                emits,
                node,
                FindingKind::DuplicateAgent,
                now,
                duplicate,
            );
            let left = self
                .live
                .cert_not_after(node)
                .map(|t| t - now / 1000)
                .filter(|left| *left <= crate::tls::EXPIRY_FINDING_SECS);
            let expiring = left.map(|left| {
                move || {
                    new_finding(
                        FindingKind::CertExpiry,
                        Severity::Warning,
                        net,
                        if left > 0 {
                            format!(
                                "the certificate of agent {node} expires in {} days",
                                left.div_euclid(86_400)
                            )
                        } else {
                            format!("the certificate of agent {node} has expired")
                        },
                        Verdict::MonitoringPath,
                        "when it expires the aggregator refuses the agent, which then buffers: issue a new certificate and reload the agent".into(),
                        now,
                        head,
                    )
                }
            });
            keep_open(
                &mut st.open,
                emits,
                node,
                FindingKind::CertExpiry,
                now,
                expiring,
            );
        }

        // Fleet head and lag, over nodes whose agents report.
        let fleet_head = active
            .iter()
            .filter_map(|n| st.nodes[*n].head.as_ref().map(|h| h.0))
            .max();
        let cfg = self.cfg();
        for node in members {
            let key = (node.clone(), FindingKind::Lag as i32);
            let height = st.nodes[node].head.as_ref().map(|h| h.0);
            let (Some(top), Some(height), false) = (fleet_head, height, silent.contains(node))
            else {
                continue;
            };
            let behind = top.saturating_sub(height);
            let next_reached = st
                .reached
                .get(net)
                .and_then(|r| r.get(&(height.saturating_add(1))))
                .copied();
            let late_ms = next_reached.map_or(0, |t| now - t);
            let lagging = behind > cfg.lag_blocks
                || (behind > 0 && late_ms > cfg.lag_after.as_millis() as i64);
            self.metrics.lag(net, node, behind);
            if lagging && !st.open.contains_key(&key) {
                let f = new_finding(
                    FindingKind::Lag,
                    Severity::Warning,
                    net,
                    format!("{node} is {behind} blocks behind the fleet head {top} (at {height})"),
                    Verdict::Node,
                    format!(
                        "other nodes of {net} reached height {} {}s ago",
                        height.saturating_add(1),
                        late_ms / 1000
                    ),
                    now,
                    height,
                );
                st.open.insert(key, f.clone());
                emits.push((node.clone(), f, true));
            } else if !lagging && behind <= cfg.lag_blocks / 2 {
                if let Some(f) = st.open.remove(&key) {
                    emits.push((node.clone(), resolved(f, now), true));
                }
            }
        }

        self.judge_divergence(st, net, &active, now, emits);

        // Network-wide stall: every reporting node has an open stall.
        let key = (network_scope(net), FindingKind::NetworkStall as i32);
        let stalled = active.len() >= 2
            && active.iter().all(|n| {
                st.nodes[*n]
                    .agent_open
                    .contains_key(&(FindingKind::Stall as i32))
            });
        if stalled && !st.open.contains_key(&key) {
            let f = new_finding(
                FindingKind::NetworkStall,
                Severity::Critical,
                net,
                format!(
                    "all {} nodes of {net} stopped advancing at height {}",
                    active.len(),
                    fleet_head.unwrap_or(0)
                ),
                Verdict::Network,
                "every reporting node stalled at once: the chain itself stopped".into(),
                now,
                fleet_head.unwrap_or(0),
            );
            st.open.insert(key.clone(), f.clone());
            emits.push((key.0.clone(), f, true));
            for n in &active {
                if let Some(v) = st.nodes.get_mut(*n) {
                    v.stall_covered = v.held_stall;
                    v.held_stall = false;
                }
            }
        } else if !stalled {
            if let Some(f) = st.open.remove(&key) {
                emits.push((key.0.clone(), resolved(f, now), true));
            }
        }

        // Held node stalls: decided once a peer advances past them.
        for node in members {
            let view = &st.nodes[node];
            if !view.held_stall {
                continue;
            }
            let height = view.head.as_ref().map_or(0, |h| h.0);
            let peer_advanced = active
                .iter()
                .any(|p| *p != node && st.nodes[*p].head.as_ref().is_some_and(|h| h.0 > height));
            if peer_advanced && !st.open.contains_key(&key) {
                let view = st.nodes.get_mut(node).expect("member");
                view.held_stall = false;
                if let Some(f) = view.agent_open.get_mut(&(FindingKind::Stall as i32)) {
                    f.verdict = Verdict::Node as i32;
                    f.verdict_reason = "other nodes of the network kept advancing".into();
                    emits.push((node.clone(), f.clone(), true));
                }
            }
        }
    }

    fn judge_divergence(
        &self,
        st: &mut State,
        net: &str,
        active: &[&String],
        now: i64,
        emits: &mut Vec<(String, Finding, bool)>,
    ) {
        let cfg = self.cfg();
        let reference: BTreeSet<&str> = cfg.reference_nodes.iter().map(String::as_str).collect();
        let found: Vec<(String, Option<Divergence>)> = {
            let mut canon = Canon::new(st, active, &reference);
            active
                .iter()
                .map(|n| ((*n).clone(), compare(st, n, &mut canon)))
                .collect()
        };
        for (node, verdict) in found {
            let key = (node.clone(), FindingKind::Divergence as i32);
            let Some(d) = verdict else {
                st.pending_divergence.remove(&node);
                if let Some(f) = st.open.remove(&key) {
                    emits.push((node, resolved(f, now), true));
                }
                continue;
            };
            if st.open.contains_key(&key) {
                continue;
            }
            let first = *st.pending_divergence.entry(node.clone()).or_insert(now);
            if now - first < DIVERGENCE_GRACE_MS {
                continue;
            }
            st.pending_divergence.remove(&node);
            let (verdict, reason) = if d.canonical_known {
                (
                    Verdict::Node,
                    format!(
                        "{} of {} nodes agree on {} at height {}; {node} holds {}",
                        d.canonical_size,
                        d.compared,
                        hex(&d.canonical_hash),
                        d.height,
                        hex(&d.own_hash)
                    ),
                )
            } else {
                (
                    Verdict::Network,
                    format!("no majority at height {}: the network is split", d.height),
                )
            };
            let fork = d
                .fork_point
                .map_or("unknown".to_string(), |f| f.to_string());
            let mut f = new_finding(
                FindingKind::Divergence,
                Severity::Critical,
                net,
                format!(
                    "{node} diverges from {net} at height {}: fork point {fork}, depth {}",
                    d.height, d.depth
                ),
                verdict,
                reason,
                now,
                d.height,
            );
            f.fork_point = d.fork_point;
            f.depth = Some(d.depth);
            f.groups = d.groups;
            st.open.insert(key, f.clone());
            emits.push((node, f, true));
        }
    }

    fn update_gauges(&self) {
        let st = self.lock();
        let mut open: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for (node, v) in &st.nodes {
            if let Some((h, _)) = &v.head {
                self.metrics.head(&v.network, node, *h);
            }
            for f in v.agent_open.values() {
                *open
                    .entry((v.network.clone(), f.kind().label()))
                    .or_default() += 1;
            }
        }
        for f in st.open.values() {
            *open
                .entry((f.network.clone(), f.kind().label()))
                .or_default() += 1;
        }
        self.metrics.findings_open(&open);
    }

    /// Per network: fleet head, each node's height, lag and agreement.
    pub fn view(&self, only: &str, now: i64) -> Vec<proto::NetworkView> {
        let st = self.lock();
        let mut nets: BTreeMap<String, proto::NetworkView> = BTreeMap::new();
        for (node, v) in &st.nodes {
            if !only.is_empty() && v.network != only {
                continue;
            }
            let net = nets
                .entry(v.network.clone())
                .or_insert_with(|| proto::NetworkView {
                    network: v.network.clone(),
                    chain: v.chain.clone(),
                    ..Default::default()
                });
            let (height, hash) = v.head.clone().unwrap_or_default();
            let silent = self.silent(node, now);
            if !silent {
                net.fleet_head = net.fleet_head.max(height);
            }
            let fleet_open = |k: FindingKind| st.open.contains_key(&(node.clone(), k as i32));
            let status = if silent {
                "silent"
            } else if fleet_open(FindingKind::Divergence) {
                "diverged"
            } else {
                match own_status(|k| v.agent_open.contains_key(&(k as i32))) {
                    "ok" if fleet_open(FindingKind::Lag) => "lagging",
                    own => own,
                }
            };
            net.nodes.push(proto::FleetNode {
                node_id: node.clone(),
                height,
                hash,
                lag: 0,
                agrees: !st
                    .open
                    .contains_key(&(node.clone(), FindingKind::Divergence as i32)),
                status: status.into(),
            });
        }
        for net in nets.values_mut() {
            let top = net.fleet_head;
            for n in &mut net.nodes {
                n.lag = top.saturating_sub(n.height);
            }
            let scope = network_scope(&net.network);
            for ((s, _), f) in &st.open {
                let member = net.nodes.iter().any(|n| &n.node_id == s);
                if member || *s == scope {
                    net.open_findings.push(NodeFinding {
                        node_id: if s.starts_with('@') {
                            String::new()
                        } else {
                            s.clone()
                        },
                        finding: Some(f.clone()),
                    });
                }
            }
            for n in &net.nodes {
                if let Some(v) = st.nodes.get(&n.node_id) {
                    for f in v.agent_open.values() {
                        net.open_findings.push(NodeFinding {
                            node_id: n.node_id.clone(),
                            finding: Some(f.clone()),
                        });
                    }
                }
            }
            net.open_findings
                .sort_by_key(|f| f.finding.as_ref().map_or(0, |f| f.opened_at_unix_ms));
        }
        nets.into_values().collect()
    }

    /// Runs `evaluate` every second (silence and lag need a clock).
    pub async fn run_clock(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.evaluate(now_unix_ms());
        }
    }

    /// A node's open findings: its agent's and the fleet's, oldest first.
    pub fn open_findings(&self, node: &str) -> Vec<Finding> {
        let st = self.lock();
        let mut open: Vec<Finding> = st
            .nodes
            .get(node)
            .map(|v| v.agent_open.values().cloned().collect())
            .unwrap_or_default();
        open.extend(
            st.open
                .iter()
                .filter(|((scope, _), _)| scope == node)
                .map(|(_, f)| f.clone()),
        );
        open.sort_by_key(|f| f.opened_at_unix_ms);
        open
    }

    /// The finding scopes of the networks (`@network`).
    pub fn network_scopes(&self) -> Vec<String> {
        let st = self.lock();
        let nets: BTreeSet<String> = st.nodes.values().map(|v| v.network.clone()).collect();
        nets.into_iter().map(|n| network_scope(&n)).collect()
    }
}

impl State {
    /// Head heights of the other nodes of a network.
    fn peers(&self, network: &str, node: &str) -> Vec<(String, u64)> {
        self.nodes
            .iter()
            .filter(|(k, v)| k.as_str() != node && v.network == network)
            .map(|(k, v)| (k.clone(), v.head.as_ref().map_or(0, |h| h.0)))
            .collect()
    }
}

fn is_fleet_kind(k: FindingKind) -> bool {
    matches!(
        k,
        FindingKind::Divergence
            | FindingKind::Lag
            | FindingKind::AgentSilent
            | FindingKind::NetworkStall
            | FindingKind::DuplicateAgent
            | FindingKind::CertExpiry
    )
}

/// Verdict for an agent finding as it opens. The bool says whether to alert
/// now; a stall waits until the peers show whether it is the node's or the
/// network's.
fn agent_verdict(
    f: &Finding,
    node: &str,
    view: &NodeView,
    peers: &[(String, u64)],
) -> (Verdict, String, bool) {
    match f.kind() {
        FindingKind::Stall => {
            if peers.is_empty() {
                return (
                    Verdict::Node,
                    "no other node in this network to compare with".into(),
                    true,
                );
            }
            // Peers that got past this node's head; the same head everywhere
            // may be the network's stall, which the fleet decides on its tick.
            let height = view.head.as_ref().map_or(0, |h| h.0);
            let advanced: Vec<&str> = peers
                .iter()
                .filter(|(_, top)| *top > height)
                .map(|(p, _)| p.as_str())
                .collect();
            if advanced.is_empty() {
                (
                    Verdict::Unspecified,
                    "waiting to see whether the other nodes advance".into(),
                    false,
                )
            } else {
                (
                    Verdict::Node,
                    format!(
                        "{node} stalled while {} kept advancing",
                        advanced.join(", ")
                    ),
                    true,
                )
            }
        }
        FindingKind::Unreachable => (
            Verdict::MonitoringPath,
            "the agent cannot reach its node's RPC; what the node does is unknown".into(),
            true,
        ),
        _ => (
            Verdict::Node,
            "reported by the node's own agent".into(),
            true,
        ),
    }
}

fn occurred_verdict(k: FindingKind) -> Verdict {
    match k {
        FindingKind::Reorg => Verdict::Network,
        FindingKind::EventsDropped => Verdict::MonitoringPath,
        _ => Verdict::Node,
    }
}

fn occurred_reason(k: FindingKind) -> &'static str {
    match k {
        FindingKind::Reorg => "the chain reorganised under the node",
        FindingKind::EventsDropped => "the agent's outbox was full",
        _ => "reported by the node's own agent",
    }
}

/// Keeps `node`'s fleet finding of `kind` open while `holds` is Some: opens
/// it, with what `holds` makes, when it is not open yet; resolves it once
/// `holds` is None.
fn keep_open(
    open: &mut HashMap<(String, i32), Finding>,
    emits: &mut Vec<(String, Finding, bool)>,
    node: &str,
    kind: FindingKind,
    now: i64,
    holds: Option<impl FnOnce() -> Finding>,
) {
    let key = (node.to_string(), kind as i32);
    match holds {
        Some(make) if !open.contains_key(&key) => {
            let f = make();
            open.insert(key, f.clone());
            emits.push((node.to_string(), f, true));
        }
        None => {
            if let Some(f) = open.remove(&key) {
                emits.push((node.to_string(), resolved(f, now), true));
            }
        }
        Some(_) => {}
    }
}

#[allow(clippy::too_many_arguments)]
fn new_finding(
    kind: FindingKind,
    severity: Severity,
    network: &str,
    summary: String,
    verdict: Verdict,
    reason: String,
    now: i64,
    height: u64,
) -> Finding {
    Finding {
        id: format!("{}-{now}", kind.label()),
        kind: kind as i32,
        severity: severity as i32,
        state: FindingState::Open as i32,
        height,
        opened_at_unix_ms: now,
        summary,
        verdict: verdict as i32,
        verdict_reason: reason,
        network: network.to_string(),
        ..Default::default()
    }
}

fn resolved(mut f: Finding, now: i64) -> Finding {
    f.state = FindingState::Resolved as i32;
    f.resolved_at_unix_ms = now;
    f
}

/// How one node stands against the canonical chain.
struct Divergence {
    height: u64,
    own_hash: Vec<u8>,
    canonical_hash: Vec<u8>,
    canonical_known: bool,
    canonical_size: usize,
    compared: usize,
    fork_point: Option<u64>,
    depth: u64,
    groups: Vec<HashGroup>,
}

/// The canonical hash per height of one network, computed once per height
/// per evaluation: the reference nodes' if any of them has one, else the
/// strict majority's; None on a tie or when nobody has the height. Also the
/// two highest heads, so "the others' top" costs nothing per node.
struct Canon<'a> {
    st: &'a State,
    nodes: &'a [&'a String],
    reference: &'a BTreeSet<&'a str>,
    memo: HashMap<u64, Option<Hash>>,
    /// (height, node) of the highest and second-highest heads.
    tops: [Option<(u64, &'a str)>; 2],
}

impl<'a> Canon<'a> {
    fn new(st: &'a State, nodes: &'a [&'a String], reference: &'a BTreeSet<&'a str>) -> Self {
        let mut tops: [Option<(u64, &str)>; 2] = [None, None];
        for n in nodes {
            let Some((h, _)) = st.nodes[*n].head else {
                continue;
            };
            if tops[0].is_none_or(|(t, _)| h > t) {
                tops[1] = tops[0];
                tops[0] = Some((h, n.as_str()));
            } else if tops[1].is_none_or(|(t, _)| h > t) {
                tops[1] = Some((h, n.as_str()));
            }
        }
        Canon {
            st,
            nodes,
            reference,
            memo: HashMap::new(),
            tops,
        }
    }

    /// The highest head among the nodes other than `node`.
    fn others_top(&self, node: &str) -> Option<u64> {
        match self.tops {
            [Some((_, n)), second] if n == node => second.map(|(h, _)| h),
            [first, _] => first.map(|(h, _)| h),
        }
    }

    fn at(&mut self, height: u64) -> Option<Hash> {
        if let Some(c) = self.memo.get(&height) {
            return c.clone();
        }
        let holders: Vec<(&str, &Hash)> = self
            .nodes
            .iter()
            .filter_map(|n| {
                self.st.nodes[*n]
                    .recent
                    .get(&height)
                    .map(|h| (n.as_str(), h))
            })
            .collect();
        let refs: Vec<&Hash> = holders
            .iter()
            .filter(|(n, _)| self.reference.contains(n))
            .map(|(_, h)| *h)
            .collect();
        let pool: Vec<&Hash> = if refs.is_empty() {
            holders.iter().map(|(_, h)| *h).collect()
        } else {
            refs
        };
        let mut counts: BTreeMap<&Hash, usize> = BTreeMap::new();
        for h in &pool {
            *counts.entry(h).or_default() += 1;
        }
        let best = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .and_then(|(best, n)| {
                let tied = counts.values().filter(|c| *c == n).count() > 1;
                (!tied).then(|| (*best).clone())
            });
        self.memo.insert(height, best.clone());
        best
    }
}

/// `hash` at `height`, as the copy `pool` holds when it is the same hash.
fn shared(pool: &mut BTreeMap<u64, Hash>, height: u64, hash: &[u8]) -> Hash {
    match pool.get(&height) {
        Some(known) if **known == *hash => known.clone(),
        Some(_) => Hash::from(hash),
        None => {
            let first = Hash::from(hash);
            pool.insert(height, first.clone());
            first
        }
    }
}

/// Drops the heights more than `window` below the highest one in `map`.
fn keep_window<V>(map: &mut BTreeMap<u64, V>, window: u64) {
    if let Some(&top) = map.keys().next_back() {
        *map = map.split_off(&top.saturating_sub(window));
    }
}

fn compare(st: &State, node: &str, canon: &mut Canon<'_>) -> Option<Divergence> {
    let view = &st.nodes[node];
    let (own_top, _) = view.head.as_ref()?;
    let height = (*own_top).min(canon.others_top(node)?);
    let own_hash = view.recent.get(&height)?.clone();
    let canonical = canon.at(height);
    if canonical.as_ref() == Some(&own_hash) {
        return None;
    }
    let holders: Vec<&String> = canon
        .nodes
        .iter()
        .copied()
        .filter(|n| st.nodes[*n].recent.contains_key(&height))
        .collect();
    if holders.len() < 2
        || holders
            .iter()
            .all(|n| st.nodes[*n].recent.get(&height) == Some(&own_hash))
    {
        return None;
    }
    let mut groups: BTreeMap<Hash, Vec<String>> = BTreeMap::new();
    for n in &holders {
        groups
            .entry(st.nodes[*n].recent[&height].clone())
            .or_default()
            .push((*n).clone());
    }
    let canonical_hash = canonical.as_deref().map(<[u8]>::to_vec).unwrap_or_default();
    let canonical_size = groups.get(&canonical_hash[..]).map_or(0, Vec::len);
    // The fork point: the highest height below where this node still agrees.
    let fork_point = view
        .recent
        .range(..height)
        .rev()
        .find(|(h, hash)| canon.at(**h).as_ref() == Some(*hash))
        .map(|(h, _)| *h);
    Some(Divergence {
        height,
        own_hash: own_hash.to_vec(),
        canonical_known: canonical.is_some(),
        canonical_size,
        compared: holders.len(),
        fork_point,
        depth: own_top - fork_point.unwrap_or(0),
        groups: groups
            .into_iter()
            .map(|(hash, node_ids)| HashGroup {
                canonical: canonical.as_ref() == Some(&hash),
                hash: hash.to_vec(),
                node_ids,
            })
            .collect(),
        canonical_hash,
    })
}

/// A node's own health in one word, from its agent's open findings, worst
/// first: `unreachable`, `stalled`, `syncing` or `ok`. The query API's node
/// summary shows this word (or `disconnected`); the fleet view puts
/// `silent`, `diverged` and `lagging`, which compare the node with its
/// network, around it.
pub fn own_status(open: impl Fn(FindingKind) -> bool) -> &'static str {
    if open(FindingKind::Unreachable) {
        "unreachable"
    } else if open(FindingKind::Stall) {
        "stalled"
    } else if open(FindingKind::Syncing) {
        "syncing"
    } else {
        "ok"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_that_agree_share_one_copy_of_a_hash() {
        let mut pool = BTreeMap::new();
        let a = shared(&mut pool, 7, &[1; 32]);
        let b = shared(&mut pool, 7, &[1; 32]);
        assert!(Arc::ptr_eq(&a, &b));
        // A fork's hash is its own copy and does not replace the shared one.
        let fork = shared(&mut pool, 7, &[2; 32]);
        assert_eq!(*fork, [2; 32]);
        assert!(!Arc::ptr_eq(&a, &fork));
        assert!(Arc::ptr_eq(&pool[&7], &a));
        // Another height is another entry.
        let c = shared(&mut pool, 8, &[1; 32]);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(pool.len(), 2);
    }

    async fn fleet(cfg: FleetConfig) -> (tempfile::TempDir, Arc<Fleet>) {
        let dir = tempfile::tempdir().unwrap();
        let store = CentralStore::open(dir.path(), 1 << 20, crate::store::Durability::ProcessCrash)
            .unwrap();
        let fleet = Fleet::load(
            store,
            cfg,
            Arc::default(),
            Alerts::start(&[]),
            Arc::default(),
        )
        .unwrap();
        (dir, fleet)
    }

    #[tokio::test]
    async fn networks_are_bounded_by_a_list_or_a_cap() {
        let (_d, capped) = fleet(FleetConfig {
            max_networks: 2,
            ..Default::default()
        })
        .await;
        assert_eq!(capped.admit("a", "ethereum"), Ok(()));
        assert_eq!(capped.admit("b", "ethereum"), Ok(()));
        assert_eq!(capped.admit("a", "ethereum"), Ok(()), "a known one");
        let e = capped.admit("c", "ethereum").unwrap_err();
        assert!(e.contains("fleet.max_networks"), "{e}");
        let e = capped.admit("bad name\n", "ethereum").unwrap_err();
        assert!(e.contains("must be 1-64 characters"), "{e}");
        assert!(capped.admit("a", "").is_err(), "an empty chain");

        let (_d, listed) = fleet(FleetConfig {
            networks: vec!["mainnet".into()],
            ..Default::default()
        })
        .await;
        assert_eq!(listed.admit("mainnet", "ethereum"), Ok(()));
        let e = listed.admit("devnet", "ethereum").unwrap_err();
        assert!(e.contains("not one this aggregator serves"), "{e}");
    }
}
