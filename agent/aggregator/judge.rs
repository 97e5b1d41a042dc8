//! The fleet's rules, with no I/O: per network, which node holds which
//! hash at which height, who lags, whose agent fell silent, and what the
//! whole network did at once. A batch of events or a clock tick, with the
//! time and what the ingest service knows of each agent's connection
//! (`Sightings`) passed in, make the new state and the findings to emit.
//! `Fleet` feeds it and stores, broadcasts and alerts what it returns.
//!
//! Every finding gets a verdict (node, network or monitoring path) with a
//! reason that names its evidence. What most nodes of a network do at once
//! is one network finding, alerted once; the node findings of that cause
//! name it (`cause_id`) and are not alerted on their own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::FleetConfig;
use crate::model::hex;
use crate::proto::{
    self, event::Kind, Finding, FindingKind, FindingState, HashGroup, NodeFinding, Severity,
    Verdict,
};

/// A block hash. The nodes of a network that agree on a height share one
/// copy of its hash (`FleetState::hashes`): a window of 256 heights costs a
/// node about 12 KiB instead of 27 with a copy per node.
type Hash = Arc<[u8]>;

/// A duplicate-agent finding stays open while a second agent was refused
/// this recently (agents retry every few seconds at most).
const DUPLICATE_AGENT_FOR_MS: i64 = 60_000;

/// A disagreement must last this long before it opens: long enough for a
/// reorg to reach every node.
const DIVERGENCE_GRACE_MS: i64 = 2_000;

/// How long a node's reorg or regression waits for its peers' reports
/// before its verdict is decided: a few polls and a batch.
pub const CORROBORATE_MS: i64 = 3_000;

/// How long a network finding takes in the reports of late nodes.
const CAUSE_JOINS_MS: i64 = 60_000;

/// A second agent process refused because another streams as the node.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub at_ms: i64,
    pub instance: String,
    pub remote: Option<SocketAddr>,
    pub owner_instance: String,
    pub owner_remote: Option<SocketAddr>,
}

/// What the ingest service knows of each agent's connection.
pub trait Sightings {
    /// When the agent last sent anything (Unix ms; 0 if never).
    fn last_seen_ms(&self, node: &str) -> i64;
    /// The last time a second agent was refused for `node`.
    fn last_refusal(&self, node: &str) -> Option<Refusal>;
    /// When the certificate `node` last connected with expires (Unix s).
    fn cert_not_after(&self, node: &str) -> Option<i64>;
}

/// One finding to store and broadcast, and whether to alert on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    /// A node id, or `@network` for a network finding.
    pub scope: String,
    pub finding: Finding,
    pub alert: bool,
}

/// What one evaluation decided, with the lag of each node for the metrics.
#[derive(Debug, Default)]
pub struct Evaluation {
    pub emits: Vec<Emit>,
    /// (network, node, blocks behind the fleet head)
    pub lags: Vec<(String, String, u64)>,
    /// The aggregator itself did not run for this long before this
    /// evaluation: the agents' silence over it is not theirs.
    pub paused_ms: Option<i64>,
}

/// Evaluations run every second; a gap this long means the aggregator
/// was not running (suspended, stopped, starved).
const AGGREGATOR_PAUSE_MS: i64 = 5_000;

pub fn network_scope(network: &str) -> String {
    format!("@{network}")
}

/// One node as the fleet sees it.
#[derive(Default, Clone)]
struct NodeView {
    network: String,
    chain: String,
    head: Option<(u64, Vec<u8>)>,
    /// Recent heights and their hashes.
    recent: BTreeMap<u64, Hash>,
    /// Hashes the node held at a height and then replaced, over the same
    /// window: what its peers' reorgs are compared with.
    given_up: BTreeMap<u64, Hash>,
    /// When the node last reported a lower head (Unix ms).
    regressed_ms: Option<i64>,
    /// The node's last decided reorg.
    last_reorg: Option<ReorgSeen>,
    /// The reorgs the node's agent reported lately: the first replaced
    /// height, the hash replaced there, and when (Unix ms). Evidence for
    /// its peers' reorgs that does not depend on the window of hashes.
    reorgs_reported: Vec<(u64, Vec<u8>, i64)>,
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

    fn height(&self) -> Option<u64> {
        self.head.as_ref().map(|h| h.0)
    }
}

/// A node's decided reorg, for the regression that came before it.
#[derive(Clone)]
struct ReorgSeen {
    /// When the reorg was reported.
    at_ms: i64,
    /// The network finding it is part of, else its own id.
    id: String,
    verdict: Verdict,
}

/// An agent finding whose verdict waits on the peers.
struct Pending {
    node: String,
    finding: Finding,
    at_ms: i64,
}

/// A network finding that late node reports join.
struct Cause {
    id: String,
    /// Heights it spans (a reorg's replaced blocks, a regression's new head).
    from: u64,
    to: u64,
    at_ms: i64,
}

#[derive(Default)]
pub struct FleetState {
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
    /// Agent reorgs and regressions waiting for their verdict.
    pending: Vec<Pending>,
    /// Network reorgs and regressions decided lately, by (network, kind).
    causes: HashMap<(String, i32), Vec<Cause>>,
    /// How often each id base (`kind:scope:anchor`) was used, so a second
    /// episode at the same anchor gets its own id; rebuilt from the store.
    ids: HashMap<String, u32>,
    /// Every network taken in, for `fleet.max_networks`.
    networks: BTreeSet<String>,
    /// Agents get `silent_after` from the aggregator's start to reconnect
    /// before their silence counts; also from the end of a pause of the
    /// aggregator's own.
    started_ms: i64,
    last_evaluated_ms: Option<i64>,
}

impl FleetState {
    pub fn new(started_ms: i64) -> FleetState {
        FleetState {
            started_ms,
            ..Default::default()
        }
    }

    /// Takes in one stored node: its head, the hashes of its recent
    /// headers, and its findings.
    pub fn load_node(
        &mut self,
        node: &str,
        network: &str,
        chain: &str,
        head: Option<(u64, Vec<u8>)>,
        headers: impl IntoIterator<Item = (u64, Vec<u8>)>,
        findings: impl IntoIterator<Item = Finding>,
    ) {
        let mut view = NodeView {
            network: network.to_string(),
            chain: chain.to_string(),
            head,
            ..Default::default()
        };
        let pool = self.hashes.entry(network.to_string()).or_default();
        for (height, hash) in headers {
            view.recent.insert(height, shared(pool, height, &hash));
        }
        for f in findings {
            if f.state() == FindingState::Occurred
                && matches!(f.kind(), FindingKind::Reorg | FindingKind::HeightRegression)
            {
                self.reload_report(node, &mut view, network, f);
                continue;
            }
            if is_fleet_kind(f.kind()) {
                self.remember_id(&f.id);
            }
            if f.state() != FindingState::Open {
                continue;
            }
            if is_fleet_kind(f.kind()) {
                self.open.insert((node.to_string(), f.kind), f);
            } else {
                view.agent_open.insert(f.kind, f);
            }
        }
        self.networks.insert(network.to_string());
        self.nodes.insert(node.to_string(), view);
    }

    /// Takes in an agent's stored reorg or regression: recent ones are
    /// evidence for the peers' (as they were before the restart), and one
    /// stored but never judged (the aggregator stopped while it waited for
    /// the peers; a judged one carries its network) is judged once the
    /// agents have had `CORROBORATE_MS` to reconnect. The receipt times are
    /// gone: what is restored counts as received at the start.
    fn reload_report(&mut self, node: &str, view: &mut NodeView, network: &str, mut f: Finding) {
        let at = self.started_ms;
        let judged = !f.network.is_empty();
        // Still evidence: a recent report, or one that waits for its verdict.
        let recent = self.started_ms - f.opened_at_unix_ms <= CAUSE_JOINS_MS || !judged;
        match f.kind() {
            FindingKind::Reorg if recent => {
                view.reorgs_reported.push(reorg_report(&f, at));
                if judged && view.last_reorg.as_ref().is_none_or(|r| r.at_ms <= at) {
                    view.last_reorg = Some(ReorgSeen {
                        at_ms: at,
                        id: if f.cause_id.is_empty() {
                            f.id.clone()
                        } else {
                            f.cause_id.clone()
                        },
                        verdict: f.verdict(),
                    });
                }
            }
            FindingKind::HeightRegression if recent => {
                view.regressed_ms = view.regressed_ms.max(Some(at));
            }
            _ => {}
        }
        if !judged {
            f.network = network.to_string();
            self.pending.push(Pending {
                node: node.to_string(),
                finding: f,
                at_ms: at,
            });
        }
    }

    /// Takes in a stored network finding.
    pub fn load_network_finding(&mut self, network: &str, f: Finding) {
        self.remember_id(&f.id);
        // Late reports join a recent network reorg, regression or an open split.
        let joinable = match (f.kind(), f.state()) {
            (FindingKind::Reorg | FindingKind::HeightRegression, FindingState::Occurred) => {
                self.started_ms - f.opened_at_unix_ms <= CAUSE_JOINS_MS
            }
            (FindingKind::Divergence, FindingState::Open) => true,
            _ => false,
        };
        if joinable {
            let (from, to) = match f.kind() {
                FindingKind::HeightRegression => (f.height, f.height),
                _ => (f.fork_point.map_or(0, |x| x + 1), f.height),
            };
            self.causes
                .entry((network.to_string(), f.kind))
                .or_default()
                .push(Cause {
                    id: f.id.clone(),
                    from,
                    to,
                    at_ms: f.opened_at_unix_ms.max(self.started_ms - CAUSE_JOINS_MS),
                });
        }
        if f.state() == FindingState::Open {
            self.open.insert((network_scope(network), f.kind), f);
        }
    }

    /// The networks of the stored nodes.
    pub fn networks(&self) -> Vec<String> {
        self.networks.iter().cloned().collect()
    }

    /// Whether an agent may report under `network` and `chain`: names that
    /// are safe as keys and labels, a network of `fleet.networks` when it is
    /// set, else at most `fleet.max_networks` distinct networks in all.
    pub fn admit(&mut self, network: &str, chain: &str, cfg: &FleetConfig) -> Result<(), String> {
        for (what, name) in [("network", network), ("chain", chain)] {
            if !crate::tls::valid_name(name) {
                return Err(format!(
                    "{what} {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
                ));
            }
        }
        if !cfg.networks.is_empty() {
            return match cfg.networks.iter().any(|n| n == network) {
                true => Ok(()),
                false => Err(format!(
                    "network {network:?} is not one this aggregator serves (fleet.networks: {})",
                    cfg.networks.join(", ")
                )),
            };
        }
        if !self.networks.contains(network) {
            if self.networks.len() >= cfg.max_networks {
                return Err(format!(
                    "this aggregator already serves {} networks, its fleet.max_networks; network {network:?} is refused",
                    self.networks.len()
                ));
            }
            self.networks.insert(network.to_string());
        }
        Ok(())
    }

    /// An id for a fleet finding, from what it is about, so that two
    /// aggregators fed the same events name it alike; a second episode
    /// with the same anchor gets a number.
    fn id(&mut self, kind: FindingKind, scope: &str, anchor: String) -> String {
        let base = format!("{}:{scope}:{anchor}", kind.label());
        let n = self.ids.entry(base.clone()).or_default();
        *n += 1;
        match *n {
            1 => base,
            n => format!("{base}:{n}"),
        }
    }

    /// Counts a stored fleet finding's id, so that no later episode takes it.
    fn remember_id(&mut self, id: &str) {
        // `kind:scope:anchor`, with `:n` from the second episode on.
        if id.split(':').count() < 3 {
            return;
        }
        let (base, n) = match id.rsplit_once(':') {
            Some((base, n))
                if base.split(':').count() >= 3 && n.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (base, n.parse().unwrap_or(1))
            }
            _ => (id, 1),
        };
        let count = self.ids.entry(base.to_string()).or_default();
        *count = (*count).max(n);
    }

    /// Takes in what one persisted batch of a node brought.
    pub fn on_batch(
        &mut self,
        node: &str,
        network: &str,
        chain: &str,
        events: &[proto::Event],
        now: i64,
        window: u64,
    ) -> Vec<Emit> {
        let mut emits = Vec::new();
        // Peers matter only to a finding that opens; finding them costs a
        // pass over the fleet, so only batches that open one pay it.
        let opens_finding = events
            .iter()
            .any(|e| matches!(&e.kind, Some(Kind::Finding(f)) if f.state() == FindingState::Open));
        let peers = if opens_finding {
            self.peers(network, node)
        } else {
            Vec::new()
        };
        let pool = self.hashes.entry(network.to_string()).or_default();
        let view = self.nodes.entry(node.to_string()).or_default();
        view.network = network.to_string();
        view.chain = chain.to_string();
        for e in events {
            match &e.kind {
                Some(Kind::Header(h)) => {
                    let hash = shared(pool, h.height, &h.hash);
                    if let Some(old) = view.recent.insert(h.height, hash.clone()) {
                        if old != hash {
                            view.given_up.insert(h.height, old);
                        }
                    }
                    view.head = Some((h.height, h.hash.clone()));
                    self.reached
                        .entry(network.to_string())
                        .or_default()
                        .entry(h.height)
                        .or_insert(now);
                }
                Some(Kind::Status(s))
                    if view.height().is_some_and(|top| s.head_height < top)
                        && !s.head_hash.is_empty() =>
                {
                    let above = view.recent.split_off(&(s.head_height.saturating_add(1)));
                    view.given_up.extend(above);
                    view.head = Some((s.head_height, s.head_hash.clone()));
                }
                Some(Kind::Finding(f)) => {
                    let mut f = f.clone();
                    f.network = network.to_string();
                    match f.state() {
                        FindingState::Open => {
                            let (verdict, reason, alert) = agent_verdict(&f, node, view, &peers);
                            f.verdict = verdict as i32;
                            f.verdict_reason = reason;
                            if f.kind() == FindingKind::Stall {
                                view.held_stall = !alert;
                            }
                            view.agent_open.insert(f.kind, f.clone());
                            emits.push(Emit {
                                scope: node.to_string(),
                                finding: f,
                                alert,
                            });
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
                            emits.push(Emit {
                                scope: node.to_string(),
                                finding: f,
                                alert: alerted,
                            });
                        }
                        _ if matches!(
                            f.kind(),
                            FindingKind::Reorg | FindingKind::HeightRegression
                        ) =>
                        {
                            if f.kind() == FindingKind::HeightRegression {
                                view.regressed_ms = Some(now);
                            } else {
                                view.reorgs_reported.retain(|r| now - r.2 <= CAUSE_JOINS_MS);
                                view.reorgs_reported.push(reorg_report(&f, now));
                            }
                            self.pending.push(Pending {
                                node: node.to_string(),
                                finding: f,
                                at_ms: now,
                            });
                        }
                        _ => {
                            if f.verdict() == Verdict::Unspecified {
                                let (verdict, reason) = occurred_verdict(f.kind());
                                f.verdict = verdict as i32;
                                f.verdict_reason = reason.into();
                            }
                            emits.push(Emit {
                                scope: node.to_string(),
                                finding: f,
                                alert: true,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(top) = view.height() {
            let floor = top.saturating_sub(window);
            view.recent = view.recent.split_off(&floor);
            view.given_up = view.given_up.split_off(&floor);
        }
        if let Some(reached) = self.reached.get_mut(network) {
            keep_window(reached, window);
        }
        keep_window(pool, window);
        // Cross-node judgement runs on the clock (`evaluate`), so a batch
        // costs the same however large the fleet.
        emits
    }

    /// Head heights of the other nodes of a network.
    fn peers(&self, network: &str, node: &str) -> Vec<(String, u64)> {
        self.nodes
            .iter()
            .filter(|(k, v)| k.as_str() != node && v.network == network)
            .map(|(k, v)| (k.clone(), v.height().unwrap_or(0)))
            .collect()
    }

    fn silent(&self, node: &str, now: i64, cfg: &FleetConfig, seen: &dyn Sightings) -> bool {
        let last = seen.last_seen_ms(node).max(self.started_ms);
        now - last > cfg.silent_after.as_millis() as i64
    }

    /// Events `first..=last` of `node` never arrived and no gap event
    /// covered them: a finding, named after the range, so a re-sent batch
    /// cannot raise it twice.
    pub fn seq_gap(node: &str, network: &str, first: u64, last: u64, now: i64) -> Emit {
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
        Emit {
            scope: node.to_string(),
            finding: f,
            alert: true,
        }
    }

    /// Re-judges every network; called every second.
    pub fn evaluate(&mut self, now: i64, cfg: &FleetConfig, seen: &dyn Sightings) -> Evaluation {
        let mut ev = Evaluation::default();
        if let Some(last) = self.last_evaluated_ms.replace(now) {
            if now - last > AGGREGATOR_PAUSE_MS {
                ev.paused_ms = Some(now - last);
                // Every agent gets silent_after again, as after a start.
                self.started_ms = now;
            }
        }
        let mut networks: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (node, v) in &self.nodes {
            networks
                .entry(v.network.clone())
                .or_default()
                .push(node.clone());
        }
        for (net, members) in &networks {
            self.judge_network(net, members, now, cfg, seen, &mut ev);
        }
        self.decide_pending(now, cfg, seen, &mut ev.emits);
        for causes in self.causes.values_mut() {
            causes.retain(|c| now - c.at_ms <= CAUSE_JOINS_MS);
        }
        ev
    }

    fn judge_network(
        &mut self,
        net: &str,
        members: &[String],
        now: i64,
        cfg: &FleetConfig,
        seen: &dyn Sightings,
        ev: &mut Evaluation,
    ) {
        let silent: BTreeSet<String> = members
            .iter()
            .filter(|n| self.silent(n, now, cfg, seen))
            .cloned()
            .collect();
        let active: Vec<String> = members
            .iter()
            .filter(|n| !silent.contains(*n))
            .cloned()
            .collect();
        let emits = &mut ev.emits;

        // Agent silent.
        for node in members {
            let key = (node.clone(), FindingKind::AgentSilent as i32);
            if silent.contains(node) && !self.open.contains_key(&key) {
                let view = &self.nodes[node];
                let last = seen.last_seen_ms(node);
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
                let summary = if last == 0 {
                    format!("agent {node} has not reported since the aggregator started")
                } else {
                    format!("agent {node} silent for {}s", (now - last) / 1000)
                };
                let height = view.height().unwrap_or(0);
                let mut f = new_finding(
                    FindingKind::AgentSilent,
                    Severity::Warning,
                    net,
                    summary,
                    verdict,
                    reason,
                    now,
                    height,
                );
                f.id = self.id(FindingKind::AgentSilent, node, format!("h{height}"));
                self.open.insert(key, f.clone());
                emits.push(Emit {
                    scope: node.clone(),
                    finding: f,
                    alert: true,
                });
            } else if !silent.contains(node) {
                if let Some(f) = self.open.remove(&key) {
                    emits.push(resolved(node, f, now, true));
                }
            }
        }

        // A second agent with this node id was refused lately; the agent's
        // certificate runs out within a week.
        for node in members {
            let head = self.nodes[node].height().unwrap_or(0);
            let refusal = seen
                .last_refusal(node)
                .filter(|r| now - r.at_ms <= DUPLICATE_AGENT_FOR_MS);
            let duplicate = refusal.map(|r| {
                let addr = |a: Option<SocketAddr>| a.map_or("-".into(), |a| a.to_string());
                let mut f = new_finding(
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
                );
                f.id = format!("duplicate-agent:{node}:{}", r.instance);
                f
            });
            self.keep_open(emits, node, FindingKind::DuplicateAgent, now, duplicate);
            let not_after = seen.cert_not_after(node);
            let expiring = not_after
                .filter(|t| t - now / 1000 <= crate::tls::EXPIRY_FINDING_SECS)
                .map(|t| {
                    let left = t - now / 1000;
                    let mut f = new_finding(
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
                    );
                    f.id = format!("cert-expiry:{node}:{t}");
                    f
                });
            self.keep_open(emits, node, FindingKind::CertExpiry, now, expiring);
        }

        // Fleet head and lag, over nodes whose agents report.
        let fleet_head = active.iter().filter_map(|n| self.nodes[n].height()).max();
        for node in members {
            let key = (node.clone(), FindingKind::Lag as i32);
            let height = self.nodes[node].height();
            let (Some(top), Some(height), false) = (fleet_head, height, silent.contains(node))
            else {
                continue;
            };
            let behind = top.saturating_sub(height);
            let next_reached = self
                .reached
                .get(net)
                .and_then(|r| r.get(&(height.saturating_add(1))))
                .copied();
            let late_ms = next_reached.map_or(0, |t| now - t);
            let lagging = behind > cfg.lag_blocks
                || (behind > 0 && late_ms > cfg.lag_after.as_millis() as i64);
            ev.lags.push((net.to_string(), node.clone(), behind));
            if lagging && !self.open.contains_key(&key) {
                let mut f = new_finding(
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
                f.id = self.id(FindingKind::Lag, node, format!("h{height}"));
                self.open.insert(key, f.clone());
                emits.push(Emit {
                    scope: node.clone(),
                    finding: f,
                    alert: true,
                });
            } else if !lagging && behind <= cfg.lag_blocks / 2 {
                if let Some(f) = self.open.remove(&key) {
                    emits.push(resolved(node, f, now, true));
                }
            }
        }

        self.judge_divergence(net, &active, now, cfg, emits);

        // Network-wide stall: every reporting node has an open stall.
        let key = (network_scope(net), FindingKind::NetworkStall as i32);
        let stalled = active.len() >= 2
            && active.iter().all(|n| {
                self.nodes[n]
                    .agent_open
                    .contains_key(&(FindingKind::Stall as i32))
            });
        if stalled && !self.open.contains_key(&key) {
            let height = fleet_head.unwrap_or(0);
            let mut f = new_finding(
                FindingKind::NetworkStall,
                Severity::Critical,
                net,
                format!(
                    "all {} nodes of {net} stopped advancing at height {height}",
                    active.len(),
                ),
                Verdict::Network,
                "every reporting node stalled at once: the chain itself stopped".into(),
                now,
                height,
            );
            f.nodes = active.clone();
            f.id = self.id(FindingKind::NetworkStall, &key.0, format!("h{height}"));
            self.open.insert(key.clone(), f.clone());
            emits.push(Emit {
                scope: key.0.clone(),
                finding: f,
                alert: true,
            });
            for n in &active {
                if let Some(v) = self.nodes.get_mut(n) {
                    v.stall_covered = v.held_stall;
                    v.held_stall = false;
                }
            }
        } else if !stalled {
            if let Some(f) = self.open.remove(&key) {
                emits.push(resolved(&key.0, f, now, true));
            }
        }

        // Held node stalls: decided once a peer advances past them.
        for node in members {
            let view = &self.nodes[node];
            if !view.held_stall {
                continue;
            }
            let height = view.height().unwrap_or(0);
            let peer_advanced = active
                .iter()
                .any(|p| p != node && self.nodes[p].height().is_some_and(|h| h > height));
            if peer_advanced && !self.open.contains_key(&key) {
                let view = self.nodes.get_mut(node).expect("member");
                view.held_stall = false;
                if let Some(f) = view.agent_open.get_mut(&(FindingKind::Stall as i32)) {
                    f.verdict = Verdict::Node as i32;
                    f.verdict_reason = "other nodes of the network kept advancing".into();
                    emits.push(Emit {
                        scope: node.clone(),
                        finding: f.clone(),
                        alert: true,
                    });
                }
            }
        }
    }

    /// Keeps `node`'s fleet finding of `kind` open while `holds` is Some:
    /// opens it when it is not open yet; resolves it once `holds` is None.
    fn keep_open(
        &mut self,
        emits: &mut Vec<Emit>,
        node: &str,
        kind: FindingKind,
        now: i64,
        holds: Option<Finding>,
    ) {
        let key = (node.to_string(), kind as i32);
        match holds {
            Some(f) if !self.open.contains_key(&key) => {
                self.open.insert(key, f.clone());
                emits.push(Emit {
                    scope: node.to_string(),
                    finding: f,
                    alert: true,
                });
            }
            None => {
                if let Some(f) = self.open.remove(&key) {
                    emits.push(resolved(node, f, now, true));
                }
            }
            Some(_) => {}
        }
    }

    fn judge_divergence(
        &mut self,
        net: &str,
        active: &[String],
        now: i64,
        cfg: &FleetConfig,
        emits: &mut Vec<Emit>,
    ) {
        let reference: BTreeSet<&str> = cfg.reference_nodes.iter().map(String::as_str).collect();
        let found: Vec<(String, Option<Divergence>)> = {
            let mut canon = Canon::new(self, active, &reference);
            active
                .iter()
                .map(|n| (n.clone(), compare(self, n, &mut canon)))
                .collect()
        };
        // A split: no majority at the height some node diverges at. One
        // network finding names every group; the nodes' own findings are
        // linked to it.
        let split = found
            .iter()
            .filter_map(|(_, d)| d.as_ref())
            .filter(|d| !d.canonical_known)
            .min_by_key(|d| d.height)
            .map(|d| (d.height, d.groups.clone(), d.fork_point));
        let split_key = (network_scope(net), FindingKind::Divergence as i32);
        match (&split, self.open.contains_key(&split_key)) {
            (Some((height, groups, fork)), false) => {
                let first = *self
                    .pending_divergence
                    .entry(split_key.0.clone())
                    .or_insert(now);
                if now - first >= DIVERGENCE_GRACE_MS {
                    self.pending_divergence.remove(&split_key.0);
                    let names: Vec<String> = groups
                        .iter()
                        .map(|g| format!("{} ({})", g.node_ids.join(", "), short(&g.hash)))
                        .collect();
                    let fork_text = fork.map_or("unknown".to_string(), |f| f.to_string());
                    let mut f = new_finding(
                        FindingKind::Divergence,
                        Severity::Critical,
                        net,
                        format!(
                            "{net} is split at height {height} into {} groups with no majority: {}; fork point {fork_text}",
                            groups.len(),
                            names.join(" against ")
                        ),
                        Verdict::Network,
                        format!(
                            "no hash at height {height} is held by more than half of the {} nodes that have it",
                            groups.iter().map(|g| g.node_ids.len()).sum::<usize>()
                        ),
                        now,
                        *height,
                    );
                    f.fork_point = *fork;
                    f.groups = groups.clone();
                    f.nodes = groups.iter().flat_map(|g| g.node_ids.clone()).collect();
                    f.id = self.id(
                        FindingKind::Divergence,
                        &split_key.0,
                        format!("f{fork_text}"),
                    );
                    // Nodes that leave one side for the other are part of it.
                    self.causes
                        .entry((net.to_string(), FindingKind::Divergence as i32))
                        .or_default()
                        .push(Cause {
                            id: f.id.clone(),
                            from: fork.map_or(0, |x| x + 1),
                            to: *height,
                            at_ms: now,
                        });
                    self.open.insert(split_key.clone(), f.clone());
                    emits.push(Emit {
                        scope: split_key.0.clone(),
                        finding: f,
                        alert: true,
                    });
                }
            }
            (None, true) => {
                if let Some(f) = self.open.remove(&split_key) {
                    self.touch_cause(net, &f.id, now);
                    emits.push(resolved(&split_key.0, f, now, true));
                }
            }
            (None, false) => {
                self.pending_divergence.remove(&split_key.0);
            }
            (Some(_), true) => {
                if let Some(id) = self.open.get(&split_key).map(|f| f.id.clone()) {
                    self.touch_cause(net, &id, now);
                }
            }
        }
        let split_id = self.open.get(&split_key).map(|f| f.id.clone());

        for (node, verdict) in found {
            let key = (node.clone(), FindingKind::Divergence as i32);
            let open_cause = self.open.get(&key).map(|f| f.cause_id.clone());
            let Some(d) = verdict else {
                self.pending_divergence.remove(&node);
                if let Some(f) = self.open.remove(&key) {
                    let alert = f.cause_id.is_empty();
                    emits.push(resolved(&node, f, now, alert));
                }
                continue;
            };
            // A node finding that belonged to a split that has ended is
            // closed with it; the node's own divergence, if it stays, opens
            // afresh with its own verdict.
            if let Some(cause) = open_cause {
                if !cause.is_empty() && split_id.as_deref() != Some(cause.as_str()) {
                    if let Some(f) = self.open.remove(&key) {
                        emits.push(resolved(&node, f, now, false));
                    }
                }
                continue;
            }
            let linked = !d.canonical_known;
            if linked && split_id.is_none() {
                // The split's network finding opens first.
                continue;
            }
            let first = *self.pending_divergence.entry(node.clone()).or_insert(now);
            if !linked && now - first < DIVERGENCE_GRACE_MS {
                continue;
            }
            self.pending_divergence.remove(&node);
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
            f.id = self.id(FindingKind::Divergence, &node, format!("f{fork}"));
            if linked {
                f.cause_id = split_id.clone().unwrap_or_default();
            }
            self.open.insert(key, f.clone());
            emits.push(Emit {
                scope: node,
                finding: f,
                alert: !linked,
            });
        }
    }

    /// Keeps an open (or just resolved) split joinable for another
    /// `CAUSE_JOINS_MS`.
    fn touch_cause(&mut self, net: &str, id: &str, now: i64) {
        let key = (net.to_string(), FindingKind::Divergence as i32);
        for c in self.causes.entry(key).or_default() {
            if c.id == id {
                c.at_ms = now;
            }
        }
    }

    /// Decides the reorgs and regressions whose peers have had time to
    /// report.
    fn decide_pending(
        &mut self,
        now: i64,
        cfg: &FleetConfig,
        seen: &dyn Sightings,
        emits: &mut Vec<Emit>,
    ) {
        let (mut due, mut waiting): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|p| now - p.at_ms >= CORROBORATE_MS);
        // A regression that the same node's reorg followed is that reorg's
        // first half (the node went back, then built other blocks): it waits
        // for the reorg's verdict and takes it.
        let (regressions, reorgs): (Vec<Pending>, Vec<Pending>) = due
            .drain(..)
            .partition(|p| p.finding.kind() == FindingKind::HeightRegression);
        due = reorgs;
        for r in regressions {
            let followed = waiting.iter().any(|w| {
                w.node == r.node && w.finding.kind() == FindingKind::Reorg && w.at_ms >= r.at_ms
            });
            if followed {
                waiting.push(r);
            } else {
                due.push(r);
            }
        }
        self.pending = waiting;
        let reference: BTreeSet<String> = cfg.reference_nodes.iter().cloned().collect();
        for p in due {
            let Some(view) = self.nodes.get(&p.node) else {
                continue;
            };
            let net = view.network.clone();
            let mut f = p.finding;
            if f.kind() == FindingKind::HeightRegression {
                if let Some(r) = view
                    .last_reorg
                    .as_ref()
                    .filter(|r| r.at_ms >= p.at_ms && r.at_ms - p.at_ms <= 2 * CORROBORATE_MS)
                {
                    f.verdict = r.verdict as i32;
                    f.verdict_reason = format!(
                        "the first part of reorg {}: the node went back, then built other blocks",
                        r.id
                    );
                    f.cause_id = r.id.clone();
                    emits.push(Emit {
                        scope: p.node,
                        finding: f,
                        alert: false,
                    });
                    continue;
                }
            }
            let peers: Vec<(&str, &NodeView)> = self
                .nodes
                .iter()
                .filter(|(n, v)| {
                    *n != &p.node && v.network == net && !self.silent(n, now, cfg, seen)
                })
                .map(|(n, v)| (n.as_str(), v))
                .collect();
            let (from, to) = match f.kind() {
                FindingKind::Reorg => (f.fork_point.map_or(0, |x| x + 1), f.height),
                _ => (f.height, f.height),
            };
            let split = self
                .causes
                .get(&(net.clone(), FindingKind::Divergence as i32))
                .and_then(|cs| cs.iter().find(|c| c.from <= to && from <= c.to))
                .map(|c| c.id.clone());
            let judged = match (f.kind(), split) {
                (FindingKind::Reorg, Some(split)) => Judged {
                    verdict: Verdict::Network,
                    reason: format!(
                        "{} left one side of the split {split} for the other",
                        p.node
                    ),
                    nodes: vec![p.node.clone()],
                    compared: peers.len() + 1,
                    cause: Some(split),
                },
                (FindingKind::Reorg, None) => reorg_verdict(&p.node, &f, &peers, &reference),
                _ => regression_verdict(&p.node, &f, &peers, p.at_ms),
            };
            f.verdict = judged.verdict as i32;
            f.verdict_reason = judged.reason.clone();
            let alert = judged.verdict != Verdict::Network;
            if !alert {
                f.cause_id = match &judged.cause {
                    Some(c) => c.clone(),
                    None => self.cause(&net, &f, from, to, &judged, now, emits),
                };
            }
            if f.kind() == FindingKind::Reorg {
                if let Some(v) = self.nodes.get_mut(&p.node) {
                    v.last_reorg = Some(ReorgSeen {
                        at_ms: p.at_ms,
                        id: if f.cause_id.is_empty() {
                            f.id.clone()
                        } else {
                            f.cause_id.clone()
                        },
                        verdict: f.verdict(),
                    });
                }
            }
            emits.push(Emit {
                scope: p.node,
                finding: f,
                alert,
            });
        }
    }

    /// The network finding a node's reorg or regression is part of: one
    /// that a peer's report opened lately over the same heights, else a new
    /// one, emitted and alerted.
    #[allow(clippy::too_many_arguments)]
    fn cause(
        &mut self,
        net: &str,
        f: &Finding,
        from: u64,
        to: u64,
        judged: &Judged,
        now: i64,
        emits: &mut Vec<Emit>,
    ) -> String {
        let key = (net.to_string(), f.kind);
        if let Some(c) = self
            .causes
            .get(&key)
            .and_then(|cs| cs.iter().find(|c| c.from <= to && from <= c.to))
        {
            return c.id.clone();
        }
        let scope = network_scope(net);
        let mut nf = f.clone();
        let nodes = judged.nodes.join(", ");
        match f.kind() {
            FindingKind::Reorg => {
                let fork = f.fork_point.map_or("none".to_string(), |x| x.to_string());
                nf.summary = format!(
                    "{net} reorganised: {} of {} nodes replaced block {} at height {from} (fork point {fork}): {nodes}",
                    judged.nodes.len(),
                    judged.compared,
                    short(&f.replaced_hash)
                );
                nf.id = self.id(
                    FindingKind::Reorg,
                    &scope,
                    format!("f{fork}:{}", short(&f.replaced_hash)),
                );
            }
            _ => {
                nf.summary = format!(
                    "{net} went back to height {from}: {} of {} nodes lowered their head at once: {nodes}",
                    judged.nodes.len(),
                    judged.compared
                );
                nf.id = self.id(FindingKind::HeightRegression, &scope, format!("h{from}"));
            }
        }
        nf.nodes = judged.nodes.clone();
        nf.cause_id = String::new();
        self.causes.entry(key).or_default().push(Cause {
            id: nf.id.clone(),
            from,
            to,
            at_ms: now,
        });
        let id = nf.id.clone();
        emits.push(Emit {
            scope,
            finding: nf,
            alert: true,
        });
        id
    }

    /// Heads and open finding counts, for the metrics.
    pub fn gauges(&self) -> (Vec<(&str, &str, u64)>, OpenCounts) {
        let mut heads = Vec::new();
        let mut open = OpenCounts::new();
        for (node, v) in &self.nodes {
            if let Some(h) = v.height() {
                heads.push((v.network.as_str(), node.as_str(), h));
            }
            for f in v.agent_open.values() {
                *open
                    .entry((v.network.clone(), f.kind().label()))
                    .or_default() += 1;
            }
        }
        for f in self.open.values() {
            *open
                .entry((f.network.clone(), f.kind().label()))
                .or_default() += 1;
        }
        (heads, open)
    }

    /// Per network: fleet head, each node's height, lag and agreement.
    pub fn view(
        &self,
        only: &str,
        now: i64,
        cfg: &FleetConfig,
        seen: &dyn Sightings,
    ) -> Vec<proto::NetworkView> {
        let mut nets: BTreeMap<String, proto::NetworkView> = BTreeMap::new();
        for (node, v) in &self.nodes {
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
            let silent = self.silent(node, now, cfg, seen);
            if !silent {
                net.fleet_head = net.fleet_head.max(height);
            }
            let fleet_open = |k: FindingKind| self.open.contains_key(&(node.clone(), k as i32));
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
                agrees: !fleet_open(FindingKind::Divergence),
                status: status.into(),
            });
        }
        for net in nets.values_mut() {
            let top = net.fleet_head;
            for n in &mut net.nodes {
                n.lag = top.saturating_sub(n.height);
            }
            let scope = network_scope(&net.network);
            for ((s, _), f) in &self.open {
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
                if let Some(v) = self.nodes.get(&n.node_id) {
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

    /// A node's open findings: its agent's and the fleet's, oldest first.
    pub fn open_findings(&self, node: &str) -> Vec<Finding> {
        let mut open: Vec<Finding> = self
            .nodes
            .get(node)
            .map(|v| v.agent_open.values().cloned().collect())
            .unwrap_or_default();
        open.extend(
            self.open
                .iter()
                .filter(|((scope, _), _)| scope == node)
                .map(|(_, f)| f.clone()),
        );
        open.sort_by_key(|f| f.opened_at_unix_ms);
        open
    }

    /// The finding scopes of the networks (`@network`).
    pub fn network_scopes(&self) -> Vec<String> {
        let nets: BTreeSet<&String> = self.nodes.values().map(|v| &v.network).collect();
        nets.into_iter().map(|n| network_scope(n)).collect()
    }
}

/// Open findings by (network, kind label).
pub type OpenCounts = BTreeMap<(String, &'static str), i64>;

/// A verdict with its reason, and the nodes that did the same.
struct Judged {
    verdict: Verdict,
    reason: String,
    /// The nodes (this one included) whose reports are the evidence.
    nodes: Vec<String>,
    /// How many nodes had something to compare at that height.
    compared: usize,
    /// The network finding it is part of, when one already speaks for it.
    cause: Option<String>,
}

/// Whose reorg this is. At the first replaced height `h`, the node held
/// `old` and now holds `new`; its peers either replaced `old` too, still
/// hold it, or never had it.
fn reorg_verdict(
    node: &str,
    f: &Finding,
    peers: &[(&str, &NodeView)],
    reference: &BTreeSet<String>,
) -> Judged {
    let h = f.fork_point.map_or(0, |x| x + 1);
    let old = &f.replaced_hash[..];
    let new = &f.new_hash[..];
    let had_old = |v: &NodeView| {
        v.recent.get(&h).is_some_and(|x| **x == *old)
            || v.given_up.get(&h).is_some_and(|x| **x == *old)
            || v.reorgs_reported.iter().any(|r| r.0 == h && r.1 == old)
    };
    let kept_old: Vec<&str> = peers
        .iter()
        .filter(|(_, v)| v.recent.get(&h).is_some_and(|x| **x == *old))
        .map(|(n, _)| *n)
        .collect();
    let mut replaced: Vec<String> = peers
        .iter()
        .filter(|(_, v)| had_old(v) && v.recent.get(&h).is_none_or(|x| **x != *old))
        .map(|(n, _)| n.to_string())
        .collect();
    replaced.push(node.to_string());
    replaced.sort();
    let on_new = peers
        .iter()
        .filter(|(_, v)| v.recent.get(&h).is_some_and(|x| **x == *new))
        .count();
    let compared = 1 + peers
        .iter()
        .filter(|(_, v)| v.recent.contains_key(&h))
        .count();
    let judged = |verdict, reason| Judged {
        verdict,
        reason,
        nodes: replaced.clone(),
        compared,
        cause: None,
    };
    if f.replaced_hash.is_empty() {
        return judged(
            Verdict::Unspecified,
            "the agent did not say which block was replaced".into(),
        );
    }
    if peers.is_empty() || compared == 1 {
        return judged(
            Verdict::Unspecified,
            format!("no other node of the network has height {h} to compare with"),
        );
    }
    let old_s = short(old);
    if let Some(r) = replaced
        .iter()
        .find(|n| n.as_str() != node && reference.contains(*n))
    {
        return judged(
            Verdict::Network,
            format!("the reference node {r} replaced block {old_s} at height {h} too"),
        );
    }
    if let Some(r) = kept_old.iter().find(|n| reference.contains(**n)) {
        return judged(
            Verdict::Node,
            format!("the reference node {r} still holds block {old_s} at height {h}: {node} left its chain"),
        );
    }
    if replaced.len() * 2 > compared {
        return judged(
            Verdict::Network,
            format!(
                "{} of {compared} nodes replaced block {old_s} at height {h}: {}",
                replaced.len(),
                replaced.join(", ")
            ),
        );
    }
    if replaced.len() == 1 && kept_old.is_empty() {
        return judged(
            Verdict::Node,
            format!(
                "{node} alone held block {old_s} at height {h}; {on_new} of the other {} nodes hold {} there: it left a side branch and rejoined the others",
                compared - 1,
                short(new)
            ),
        );
    }
    if !kept_old.is_empty() {
        return judged(
            Verdict::Node,
            format!(
                "{} of {compared} nodes still hold block {old_s} at height {h}: {node} left the chain they follow",
                kept_old.len()
            ),
        );
    }
    judged(
        Verdict::Node,
        format!(
            "only {} of {compared} nodes replaced block {old_s} at height {h}: {}",
            replaced.len(),
            replaced.join(", ")
        ),
    )
}

/// What a reorg report says was replaced: the first height and its old hash.
fn reorg_report(f: &Finding, at_ms: i64) -> (u64, Vec<u8>, i64) {
    (
        f.fork_point.map_or(0, |x| x + 1),
        f.replaced_hash.clone(),
        at_ms,
    )
}

/// Whose head regression this is: most of the network's nodes going back
/// within `CORROBORATE_MS` of each other is the network's.
fn regression_verdict(node: &str, f: &Finding, peers: &[(&str, &NodeView)], at_ms: i64) -> Judged {
    let mut regressed: Vec<String> = peers
        .iter()
        .filter(|(_, v)| {
            v.regressed_ms
                .is_some_and(|t| (t - at_ms).abs() <= CORROBORATE_MS)
        })
        .map(|(n, _)| n.to_string())
        .collect();
    regressed.push(node.to_string());
    regressed.sort();
    let compared = peers.len() + 1;
    let nodes = regressed.clone();
    let (verdict, reason) = if peers.is_empty() {
        (
            Verdict::Unspecified,
            "no other node of the network to compare with".to_string(),
        )
    } else if regressed.len() * 2 > compared {
        (
            Verdict::Network,
            format!(
                "{} of {compared} nodes lowered their head at once: {}",
                regressed.len(),
                regressed.join(", ")
            ),
        )
    } else {
        let top = peers
            .iter()
            .filter_map(|(_, v)| v.height())
            .max()
            .unwrap_or(0);
        (
            Verdict::Node,
            format!(
                "{node} went back to height {} while the other nodes hold heads up to {top}",
                f.height
            ),
        )
    };
    Judged {
        verdict,
        reason,
        nodes,
        compared,
        cause: None,
    }
}

fn short(hash: &[u8]) -> String {
    hex(&hash[..hash.len().min(6)])
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
    // The agent judged it from what only it sees (its node's process, how
    // the RPC failed).
    if f.verdict() != Verdict::Unspecified {
        return (f.verdict(), f.verdict_reason.clone(), true);
    }
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
            let height = view.height().unwrap_or(0);
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

fn occurred_verdict(k: FindingKind) -> (Verdict, &'static str) {
    match k {
        FindingKind::EventsDropped => (Verdict::MonitoringPath, "the agent's outbox was full"),
        FindingKind::AgentPaused => (Verdict::MonitoringPath, "the agent did not run for a while"),
        _ => (Verdict::Node, "reported by the node's own agent"),
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

fn resolved(scope: &str, mut f: Finding, now: i64, alert: bool) -> Emit {
    f.state = FindingState::Resolved as i32;
    f.resolved_at_unix_ms = now;
    Emit {
        scope: scope.to_string(),
        finding: f,
        alert,
    }
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
    st: &'a FleetState,
    nodes: &'a [String],
    reference: &'a BTreeSet<&'a str>,
    memo: HashMap<u64, Option<Hash>>,
    /// (height, node) of the highest and second-highest heads.
    tops: [Option<(u64, &'a str)>; 2],
}

impl<'a> Canon<'a> {
    fn new(st: &'a FleetState, nodes: &'a [String], reference: &'a BTreeSet<&'a str>) -> Self {
        let mut tops: [Option<(u64, &str)>; 2] = [None, None];
        for n in nodes {
            let Some(h) = st.nodes[n].height() else {
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
                self.st.nodes[n]
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

fn compare(st: &FleetState, node: &str, canon: &mut Canon<'_>) -> Option<Divergence> {
    let view = &st.nodes[node];
    let own_top = view.height()?;
    let height = own_top.min(canon.others_top(node)?);
    let own_hash = view.recent.get(&height)?.clone();
    let canonical = canon.at(height);
    if canonical.as_ref() == Some(&own_hash) {
        return None;
    }
    let holders: Vec<&String> = canon
        .nodes
        .iter()
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
mod tests;
