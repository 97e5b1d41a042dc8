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

/// Every agent last seen at this time (Unix ms); none refused; no
/// certificate runs out: the sightings for trying the rules alone, in
/// tests and benchmarks.
pub struct SeenAt(pub i64);

impl Sightings for SeenAt {
    fn last_seen_ms(&self, _: &str) -> i64 {
        self.0
    }
    fn last_refusal(&self, _: &str) -> Option<Refusal> {
        None
    }
    fn cert_not_after(&self, _: &str) -> Option<i64> {
        None
    }
}

/// One finding to store and broadcast, and whether to alert on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    /// A node id, or `@network` for a network finding.
    pub scope: String,
    pub finding: Finding,
    pub alert: bool,
}

/// What one evaluation decided, with the lags that changed for the metrics.
#[derive(Debug, Default)]
pub struct Evaluation {
    pub emits: Vec<Emit>,
    /// (network, node, blocks behind the fleet head) of each node whose
    /// lag differs from the one the last evaluation found.
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

/// A finding stored under `scope` as the query API and the alerts carry it:
/// a node's under its node id, a network's (`@network`) under none.
pub fn node_finding(scope: &str, f: Finding) -> NodeFinding {
    NodeFinding {
        node_id: if scope.starts_with('@') {
            String::new()
        } else {
            scope.to_string()
        },
        finding: Some(f),
    }
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
    /// Its agent's last batch said more events were pending: it is
    /// delivering a backlog (after a cut, or to an aggregator that was
    /// down), and its height is not yet the node's. Not judged for lag.
    /// Also true for a node loaded from the store until its agent reports.
    replaying: bool,
    /// Blocks behind its network's head at the last evaluation that judged
    /// it, so that `lags` names only the nodes whose lag changed.
    judged_lag: Option<u64>,
}

impl NodeView {
    fn healthy(&self) -> bool {
        self.agent_open.is_empty()
    }

    fn height(&self) -> Option<u64> {
        self.head.as_ref().map(|h| h.0)
    }
}

/// A node's decided reorg, for the regression that came before it and
/// for peers that report the same reorg later.
#[derive(Clone)]
struct ReorgSeen {
    /// When the reorg was reported.
    at_ms: i64,
    /// The network finding it is part of, else its own id.
    id: String,
    verdict: Verdict,
    /// The finding as emitted.
    finding: Finding,
}

impl ReorgSeen {
    fn of(at_ms: i64, f: &Finding) -> ReorgSeen {
        ReorgSeen {
            at_ms,
            id: if f.cause_id.is_empty() {
                f.id.clone()
            } else {
                f.cause_id.clone()
            },
            verdict: f.verdict(),
            finding: f.clone(),
        }
    }
}

/// An agent finding whose verdict waits on the peers.
struct Pending {
    node: String,
    finding: Finding,
    at_ms: i64,
}

/// When a height of a network was reached: by whom first, and when a
/// second node corroborated it.
struct Reached {
    first: String,
    first_ms: i64,
    second_ms: Option<i64>,
}

impl Reached {
    fn by(&mut self, node: &str, now: i64) {
        if self.second_ms.is_none() && self.first != node {
            self.second_ms = Some(now);
        }
    }

    /// Since when the height counts as the network's: once a second node
    /// reached it, or at once when the first is trusted alone (a reference
    /// node, or the only node reporting).
    fn since(&self, trusted: impl Fn(&str) -> bool) -> Option<i64> {
        if trusted(&self.first) {
            Some(self.first_ms)
        } else {
            self.second_ms
        }
    }
}

/// The fleet head of a network from its reporting nodes' heights (each with
/// whether the node is a reference node): the highest height that two nodes
/// reached, or that a reference node reached, or the only node's. One node
/// alone above the others does not raise it: a node that serves blocks of
/// its own would make every honest node lag.
pub fn corroborated_head(heads: &[(u64, bool)]) -> Option<u64> {
    let reference = heads.iter().filter(|h| h.1).map(|h| h.0).max();
    let mut heights: Vec<u64> = heads.iter().map(|h| h.0).collect();
    heights.sort_unstable_by(|a, b| b.cmp(a));
    let second = heights.get(1).or(heights.first()).copied();
    second.max(reference)
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
    /// Per network: who first reached each recent height and when, and
    /// when a second node did.
    reached: HashMap<String, BTreeMap<u64, Reached>>,
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
            // What the store held; the node's own height comes with its
            // agent's first batch after the start.
            replaying: true,
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

    /// A node whose agent's stream was accepted: judged from now on
    /// (silence first of all), also if it sends no batch before it dies.
    pub fn know(&mut self, node: &str, network: &str, chain: &str) {
        view_of(&mut self.nodes, node, network, chain);
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
        let view = view_of(&mut self.nodes, node, network, chain);
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
                        .or_insert_with(|| Reached {
                            first: node.to_string(),
                            first_ms: now,
                            second_ms: None,
                        })
                        .by(node, now);
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
                self.raise(emits, key, f, true);
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
        let reference = |n: &str| cfg.reference_nodes.iter().any(|r| r == n);
        let heads = self.heads(&active, cfg);
        let fleet_head = corroborated_head(&heads);
        let lone = heads.len() == 1;
        for node in members {
            let key = (node.clone(), FindingKind::Lag as i32);
            let height = self.nodes[node].height();
            let replaying = self.nodes[node].replaying;
            let (Some(top), Some(height), false) =
                (fleet_head, height, silent.contains(node) || replaying)
            else {
                continue;
            };
            let behind = top.saturating_sub(height);
            let judged = &mut self.nodes.get_mut(node).expect("a member").judged_lag;
            if *judged != Some(behind) {
                *judged = Some(behind);
                ev.lags.push((net.to_string(), node.clone(), behind));
            }
            let next_reached = self
                .reached
                .get(net)
                .and_then(|r| r.get(&(height.saturating_add(1))))
                .and_then(|r| r.since(|n| lone || reference(n)));
            let late_ms = next_reached.map_or(0, |t| now - t);
            let lagging = behind > cfg.lag_blocks
                || (behind > 0 && late_ms > cfg.lag_after.as_millis() as i64);
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
                self.raise(emits, key, f, true);
            } else if !lagging && behind <= cfg.lag_blocks / 2 {
                if let Some(f) = self.open.remove(&key) {
                    emits.push(resolved(node, f, now, true));
                }
            }
            self.judge_ahead(net, node, height, top, now, cfg, emits);
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
            self.raise(emits, key.clone(), f, true);
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
            let peer_advanced = fleet_head.is_some_and(|top| top > height);
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

    /// A node more than `lag_blocks` above the fleet head for `lag_after`:
    /// no other node reached its height. Undecided: it may be first on a
    /// chain the others do not follow yet, or serve blocks of its own.
    #[allow(clippy::too_many_arguments)]
    fn judge_ahead(
        &mut self,
        net: &str,
        node: &str,
        height: u64,
        top: u64,
        now: i64,
        cfg: &FleetConfig,
        emits: &mut Vec<Emit>,
    ) {
        let key = (node.to_string(), FindingKind::AheadAlone as i32);
        let ahead = height.saturating_sub(top);
        let bound = top.saturating_add(cfg.lag_blocks).saturating_add(1);
        let since = self
            .reached
            .get(net)
            .and_then(|r| r.get(&bound))
            .map_or(now, |r| r.first_ms);
        let alone = ahead > cfg.lag_blocks && now - since > cfg.lag_after.as_millis() as i64;
        if alone && !self.open.contains_key(&key) {
            let mut f = new_finding(
                FindingKind::AheadAlone,
                Severity::Warning,
                net,
                format!("{node} is {ahead} blocks above the fleet head {top} (at {height})"),
                Verdict::Unspecified,
                format!(
                    "no other node of {net} reached height {bound} in {}s: {node} is first on a chain the others do not follow, or serves blocks of its own (a reference node in fleet.reference_nodes decides which)",
                    (now - since) / 1000
                ),
                now,
                height,
            );
            f.id = self.id(FindingKind::AheadAlone, node, format!("h{height}"));
            self.raise(emits, key, f, true);
        } else if ahead <= cfg.lag_blocks / 2 {
            if let Some(f) = self.open.remove(&key) {
                emits.push(resolved(node, f, now, true));
            }
        }
    }

    /// The heights of those of `nodes` that have one, each with whether the
    /// node is a reference node: what `corroborated_head` takes.
    fn heads(&self, nodes: &[String], cfg: &FleetConfig) -> Vec<(u64, bool)> {
        nodes
            .iter()
            .filter_map(|n| Some((self.nodes[n].height()?, cfg.reference_nodes.contains(n))))
            .collect()
    }

    /// Opens the fleet finding `f` under `key` and emits it.
    fn raise(&mut self, emits: &mut Vec<Emit>, key: (String, i32), f: Finding, alert: bool) {
        emits.push(Emit {
            scope: key.0.clone(),
            finding: f.clone(),
            alert,
        });
        self.open.insert(key, f);
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
                self.raise(emits, key, f, true);
            }
            None => {
                if let Some(f) = self.open.remove(&key) {
                    emits.push(resolved(node, f, now, true));
                }
            }
            Some(_) => {}
        }
    }

    /// The open findings that were alerted on their own: fleet findings and
    /// agent findings not linked to a network finding, less stalls still
    /// waiting for their verdict. What a restart keeps posting to
    /// Alertmanager.
    pub fn firing(&self) -> Vec<NodeFinding> {
        let fleet = self
            .open
            .iter()
            .filter(|(_, f)| f.cause_id.is_empty())
            .map(|((scope, _), f)| node_finding(scope, f.clone()));
        let agents = self.nodes.iter().flat_map(|(node, v)| {
            v.agent_open
                .values()
                .filter(|f| {
                    f.cause_id.is_empty()
                        && !(f.kind() == FindingKind::Stall && f.verdict() == Verdict::Unspecified)
                })
                .map(move |f| node_finding(node, f.clone()))
        });
        fleet.chain(agents).collect()
    }

    /// Whether `node`'s agent has events pending after its last batch.
    pub fn set_pending(&mut self, node: &str, pending: u64) {
        if let Some(v) = self.nodes.get_mut(node) {
            v.replaying = pending > 0;
        }
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
        let mut reporting: BTreeMap<String, Vec<String>> = BTreeMap::new();
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
                reporting
                    .entry(v.network.clone())
                    .or_default()
                    .push(node.clone());
            }
            let fleet_open = |k: FindingKind| self.open.contains_key(&(node.clone(), k as i32));
            let status = if silent {
                "silent"
            } else if fleet_open(FindingKind::Divergence) {
                "diverged"
            } else {
                match own_status(|k| v.agent_open.contains_key(&(k as i32))) {
                    "ok" if fleet_open(FindingKind::Lag) => "lagging",
                    "ok" if fleet_open(FindingKind::AheadAlone) => "ahead",
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
            let top = reporting
                .get(&net.network)
                .and_then(|nodes| corroborated_head(&self.heads(nodes, cfg)))
                .unwrap_or(0);
            net.fleet_head = top;
            for n in &mut net.nodes {
                n.lag = top.saturating_sub(n.height);
            }
            let scope = network_scope(&net.network);
            for ((s, _), f) in &self.open {
                let member = net.nodes.iter().any(|n| &n.node_id == s);
                if member || *s == scope {
                    net.open_findings.push(node_finding(s, f.clone()));
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

/// `node`'s view, made if it is new, in `network` of `chain`.
fn view_of<'a>(
    nodes: &'a mut BTreeMap<String, NodeView>,
    node: &str,
    network: &str,
    chain: &str,
) -> &'a mut NodeView {
    let view = nodes.entry(node.to_string()).or_default();
    view.network = network.to_string();
    view.chain = chain.to_string();
    view
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

mod corroborate;
mod divergence;

use corroborate::reorg_report;

#[cfg(test)]
mod tests;
