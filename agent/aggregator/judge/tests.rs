//! The fleet's rules, tried on recorded sequences of agent reports: chains
//! of several nodes, forks, reorgs, regressions and silences, with the time
//! passed in.

use super::*;
use proptest::prelude::*;
use std::time::Duration;

const NET: &str = "devnet";

fn hash(branch: u8, height: u64) -> Vec<u8> {
    let mut v = vec![branch; 24];
    v.extend_from_slice(&height.to_be_bytes());
    v
}

fn header(branch: u8, height: u64) -> proto::Event {
    proto::Event {
        kind: Some(Kind::Header(proto::Header {
            height,
            hash: hash(branch, height),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn finding(f: Finding) -> proto::Event {
    proto::Event {
        kind: Some(Kind::Finding(f)),
        ..Default::default()
    }
}

/// The agent's reorg finding: blocks `fork+1..=old_top` of `from` replaced
/// by `to`'s.
fn reorg(from: u8, to: u8, fork: u64, old_top: u64) -> proto::Event {
    finding(Finding {
        id: format!("reorg-{old_top}-{from}-{to}"),
        kind: FindingKind::Reorg as i32,
        state: FindingState::Occurred as i32,
        height: old_top,
        fork_point: Some(fork),
        depth: Some(old_top - fork),
        replaced_hash: hash(from, fork + 1),
        new_hash: hash(to, fork + 1),
        ..Default::default()
    })
}

fn status(height: u64, branch: u8) -> proto::Event {
    proto::Event {
        kind: Some(Kind::Status(proto::NodeStatus {
            head_height: height,
            head_hash: hash(branch, height),
            reachable: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn regression(to: u64) -> proto::Event {
    finding(Finding {
        id: format!("height-regression-{to}"),
        kind: FindingKind::HeightRegression as i32,
        state: FindingState::Occurred as i32,
        height: to,
        ..Default::default()
    })
}

/// What the aggregator's store holds: each node's head and headers, and
/// every finding as last written, the agents' reports as ingest stores
/// them (before the fleet judges them) and the fleet's emits over them.
#[derive(Default)]
struct Store {
    heads: BTreeMap<String, (u64, Vec<u8>)>,
    headers: BTreeMap<String, BTreeMap<u64, Vec<u8>>>,
    findings: BTreeMap<String, BTreeMap<String, Finding>>,
}

impl Store {
    fn batch(&mut self, node: &str, events: &[proto::Event]) {
        for e in events {
            match &e.kind {
                Some(Kind::Header(h)) => {
                    self.headers
                        .entry(node.into())
                        .or_default()
                        .insert(h.height, h.hash.clone());
                    self.heads.insert(node.into(), (h.height, h.hash.clone()));
                }
                Some(Kind::Finding(f)) => {
                    self.findings
                        .entry(node.into())
                        .or_default()
                        .insert(f.id.clone(), f.clone());
                }
                _ => {}
            }
        }
    }

    fn emits(&mut self, emits: &[Emit]) {
        for e in emits {
            self.findings
                .entry(e.scope.clone())
                .or_default()
                .insert(e.finding.id.clone(), e.finding.clone());
        }
    }

    /// The fleet's state as a start at `now` loads it.
    fn load(&self, now: i64) -> FleetState {
        let mut st = FleetState::new(now);
        for (node, head) in &self.heads {
            let headers = self.headers[node].iter().map(|(h, x)| (*h, x.clone()));
            let findings = self
                .findings
                .get(node)
                .into_iter()
                .flat_map(|m| m.values().cloned());
            st.load_node(node, NET, "ethereum", Some(head.clone()), headers, findings);
        }
        for f in self
            .findings
            .get("@devnet")
            .into_iter()
            .flat_map(|m| m.values())
        {
            st.load_network_finding(NET, f.clone());
        }
        st
    }
}

/// A fleet under test: the rules, a clock, everything they emitted, and
/// the store those reports and emits made, to restart from.
struct Fleet {
    st: FleetState,
    cfg: FleetConfig,
    now: i64,
    emitted: Vec<Emit>,
    store: Store,
}

impl Fleet {
    fn new() -> Fleet {
        Fleet {
            st: FleetState::new(0),
            cfg: FleetConfig::default(),
            now: 1_000,
            emitted: Vec::new(),
            store: Store::default(),
        }
    }

    fn batch(&mut self, node: &str, events: Vec<proto::Event>) {
        self.store.batch(node, &events);
        let e = self
            .st
            .on_batch(node, NET, "ethereum", &events, self.now, 256);
        // As the shell does: an agent with nothing more pending.
        self.st.set_pending(node, 0);
        self.store.emits(&e);
        self.emitted.extend(e);
    }

    /// The aggregator stops and starts again on what its store holds.
    fn restart(&mut self) {
        self.st = self.store.load(self.now);
    }

    /// Lets `ms` pass with an evaluation every second.
    fn wait(&mut self, ms: i64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += 1000.min(end - self.now);
            let ev = self.st.evaluate(self.now, &self.cfg, &SeenAt(self.now));
            self.store.emits(&ev.emits);
            self.emitted.extend(ev.emits);
        }
    }

    /// Mines blocks `heights` of `branch` on `nodes`.
    fn mine(&mut self, nodes: &[&str], branch: u8, heights: std::ops::RangeInclusive<u64>) {
        for n in nodes {
            self.batch(n, heights.clone().map(|h| header(branch, h)).collect());
        }
    }

    fn of(&self, kind: FindingKind) -> Vec<&Emit> {
        self.emitted
            .iter()
            .filter(|e| e.finding.kind() == kind)
            .collect()
    }

    fn alerted(&self) -> Vec<(String, FindingKind, FindingState)> {
        self.emitted
            .iter()
            .filter(|e| e.alert)
            .map(|e| (e.scope.clone(), e.finding.kind(), e.finding.state()))
            .collect()
    }
}

const FOUR: [&str; 4] = ["node-1", "node-2", "node-3", "node-4"];

/// `n` nodes share blocks `1..=top`, then each replaces the blocks above
/// `fork` with branch 7's (one more block than before), reporting
/// `delays[i]` ms after the first, in the order of the delays; with
/// `restart`, the aggregator restarts before that report (after all of
/// them when it is past the last). Returns the fleet 6 s after the last
/// report, and the nodes.
fn network_reorg(
    n: usize,
    top: u64,
    fork: u64,
    delays: &[i64],
    restart: Option<usize>,
) -> (Fleet, Vec<String>) {
    let nodes: Vec<String> = (1..=n).map(|i| format!("node-{i}")).collect();
    let mut f = Fleet::new();
    for node in &nodes {
        f.batch(node, (1..=top).map(|h| header(0, h)).collect());
    }
    f.wait(3_000);
    let mut order: Vec<(i64, &String)> = delays.iter().copied().zip(&nodes).collect();
    order.sort();
    let start = f.now;
    for (i, (d, node)) in order.iter().enumerate() {
        if restart == Some(i) {
            f.restart();
        }
        let ahead = start + d - f.now;
        if ahead > 0 {
            f.wait(ahead);
        }
        let mut events: Vec<proto::Event> = (fork + 1..=top + 1).map(|h| header(7, h)).collect();
        events.push(reorg(0, 7, fork, top));
        f.batch(node, events);
    }
    if restart.is_some_and(|r| r >= n) {
        f.restart();
    }
    f.wait(6_000);
    (f, nodes)
}

fn four_at(height: u64) -> Fleet {
    let mut f = Fleet::new();
    f.mine(&FOUR, 0, 1..=height);
    f.wait(3_000);
    f
}

#[test]
fn a_quiet_fleet_emits_nothing() {
    let mut f = four_at(10);
    for h in 11..=70 {
        f.mine(&FOUR, 0, h..=h);
        f.wait(1_000);
    }
    assert_eq!(f.emitted, vec![]);
}

#[test]
fn a_node_that_sat_on_a_side_branch_alone_and_rejoined_is_the_nodes_reorg() {
    let mut f = four_at(7);
    // node-2 alone mines blocks 8..=9 of its own; the others go on.
    f.mine(&["node-2"], 2, 8..=9);
    f.mine(&["node-1", "node-3", "node-4"], 0, 8..=9);
    f.wait(3_000);
    let div = f.of(FindingKind::Divergence);
    assert_eq!(div.len(), 1, "{div:?}");
    assert_eq!(
        (div[0].scope.as_str(), div[0].finding.verdict()),
        ("node-2", Verdict::Node)
    );
    // It reorgs back onto the others' chain.
    f.batch(
        "node-2",
        vec![header(0, 8), header(0, 9), header(0, 10), reorg(2, 0, 7, 9)],
    );
    f.mine(&["node-1", "node-3", "node-4"], 0, 10..=10);
    f.wait(4_000);
    let r = f.of(FindingKind::Reorg);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].scope, "node-2");
    assert_eq!(
        r[0].finding.verdict(),
        Verdict::Node,
        "{}",
        r[0].finding.verdict_reason
    );
    assert!(
        r[0].finding.verdict_reason.contains("alone held"),
        "{}",
        r[0].finding.verdict_reason
    );
    assert!(r[0].alert);
    assert_eq!(
        f.alerted(),
        vec![
            ("node-2".into(), FindingKind::Divergence, FindingState::Open),
            (
                "node-2".into(),
                FindingKind::Divergence,
                FindingState::Resolved
            ),
            ("node-2".into(), FindingKind::Reorg, FindingState::Occurred),
        ]
    );
}

#[test]
fn one_node_that_reorged_while_its_peers_kept_the_old_blocks_is_the_nodes() {
    let mut f = four_at(10);
    f.batch(
        "node-3",
        vec![
            header(3, 8),
            header(3, 9),
            header(3, 10),
            reorg(0, 3, 7, 10),
        ],
    );
    f.wait(4_000);
    let r = f.of(FindingKind::Reorg);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].finding.verdict(), Verdict::Node);
    assert!(
        r[0].finding
            .verdict_reason
            .contains("3 of 4 nodes still hold"),
        "{}",
        r[0].finding.verdict_reason
    );
}

#[test]
fn a_reorg_of_the_whole_network_is_one_network_finding_alerted_once() {
    let mut f = four_at(10);
    for (i, n) in FOUR.iter().enumerate() {
        f.batch(
            n,
            vec![
                header(5, 8),
                header(5, 9),
                header(5, 10),
                header(5, 11),
                reorg(0, 5, 7, 10),
            ],
        );
        f.wait(if i % 2 == 0 { 400 } else { 700 });
    }
    f.wait(5_000);
    let r = f.of(FindingKind::Reorg);
    let network: Vec<&&Emit> = r.iter().filter(|e| e.scope == "@devnet").collect();
    assert_eq!(network.len(), 1, "{r:?}");
    let nf = &network[0].finding;
    assert_eq!(nf.verdict(), Verdict::Network);
    assert_eq!(nf.nodes.len(), 4, "{nf:?}");
    assert!(network[0].alert);
    let nodes: Vec<&&Emit> = r.iter().filter(|e| e.scope != "@devnet").collect();
    assert_eq!(nodes.len(), 4);
    for e in nodes {
        assert_eq!(
            e.finding.verdict(),
            Verdict::Network,
            "{}",
            e.finding.verdict_reason
        );
        assert_eq!(e.finding.cause_id, nf.id);
        assert!(!e.alert, "a node's part of a network reorg is not alerted");
    }
    assert_eq!(
        f.alerted(),
        vec![("@devnet".into(), FindingKind::Reorg, FindingState::Occurred)]
    );
}

#[test]
fn a_two_against_two_split_is_one_network_finding_naming_both_groups() {
    let mut f = four_at(7);
    f.mine(&["node-1", "node-2"], 1, 8..=10);
    f.mine(&["node-3", "node-4"], 2, 8..=10);
    f.wait(4_000);
    let split: Vec<Emit> = f
        .of(FindingKind::Divergence)
        .into_iter()
        .filter(|e| e.scope == "@devnet")
        .cloned()
        .collect();
    assert_eq!(split.len(), 1);
    let s = &split[0].finding;
    assert_eq!(s.verdict(), Verdict::Network);
    assert_eq!(s.groups.len(), 2);
    assert_eq!(s.fork_point, Some(7));
    assert!(
        s.summary.contains("node-1, node-2") && s.summary.contains("node-3, node-4"),
        "{}",
        s.summary
    );
    assert_eq!(
        f.alerted(),
        vec![(
            "@devnet".into(),
            FindingKind::Divergence,
            FindingState::Open
        )]
    );
    // Every node shows as diverged, linked to the split.
    let view = f.st.view("", f.now, &f.cfg, &SeenAt(f.now));
    assert!(
        view[0].nodes.iter().all(|n| n.status == "diverged"),
        "{view:?}"
    );
    for e in f
        .of(FindingKind::Divergence)
        .into_iter()
        .filter(|e| e.scope != "@devnet")
    {
        assert_eq!(e.finding.cause_id, s.id);
    }
    // node-3 and node-4 switch to the other branch: the split resolves,
    // alerted once; the linked node findings close silently, and the two
    // reorgs that ended it are part of it.
    for n in ["node-3", "node-4"] {
        f.batch(
            n,
            vec![
                header(1, 8),
                header(1, 9),
                header(1, 10),
                reorg(2, 1, 7, 10),
            ],
        );
    }
    f.wait(5_000);
    assert_eq!(
        f.alerted(),
        vec![
            (
                "@devnet".into(),
                FindingKind::Divergence,
                FindingState::Open
            ),
            (
                "@devnet".into(),
                FindingKind::Divergence,
                FindingState::Resolved
            ),
        ]
    );
    let reorgs = f.of(FindingKind::Reorg);
    assert_eq!(reorgs.len(), 2);
    for r in reorgs {
        assert_eq!(r.finding.verdict(), Verdict::Network);
        assert_eq!(r.finding.cause_id, s.id);
    }
    let open: Vec<String> = FOUR
        .iter()
        .flat_map(|n| f.st.open_findings(n))
        .map(|f| f.id)
        .collect();
    assert_eq!(open, Vec::<String>::new());
}

#[test]
fn a_network_that_went_back_and_built_other_blocks_is_one_alert_for_one_reorg() {
    // Every node rolled back to 7 and built blocks 8 and 9 of another
    // branch: each agent saw a lower head, then the replaced blocks.
    let mut f = four_at(10);
    for n in FOUR {
        f.batch(n, vec![status(7, 0), regression(7)]);
    }
    f.wait(400);
    for n in FOUR {
        f.batch(n, vec![header(4, 8), header(4, 9), reorg(0, 4, 7, 10)]);
    }
    f.wait(8_000);
    assert_eq!(
        f.alerted(),
        vec![("@devnet".into(), FindingKind::Reorg, FindingState::Occurred)]
    );
    let network = &f.of(FindingKind::Reorg)[0].finding;
    let regressions = f.of(FindingKind::HeightRegression);
    assert_eq!(regressions.len(), 4);
    for r in regressions {
        assert_eq!(r.finding.cause_id, network.id, "{:?}", r.finding);
        assert_eq!(r.finding.verdict(), Verdict::Network);
    }
}

#[test]
fn a_network_that_went_back_at_once_is_one_network_regression() {
    let mut f = four_at(10);
    for n in FOUR {
        f.batch(n, vec![status(6, 0), regression(6)]);
        f.wait(300);
    }
    f.wait(4_000);
    let r = f.of(FindingKind::HeightRegression);
    let network: Vec<&&Emit> = r.iter().filter(|e| e.scope == "@devnet").collect();
    assert_eq!(network.len(), 1, "{r:?}");
    assert!(r.iter().all(|e| e.finding.verdict() == Verdict::Network));
    assert_eq!(
        f.alerted(),
        vec![(
            "@devnet".into(),
            FindingKind::HeightRegression,
            FindingState::Occurred
        )]
    );
}

#[test]
fn one_node_that_went_back_alone_is_the_nodes() {
    let mut f = four_at(10);
    f.batch("node-4", vec![status(6, 0), regression(6)]);
    f.wait(4_000);
    let r = f.of(FindingKind::HeightRegression);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].scope.as_str(), r[0].finding.verdict()),
        ("node-4", Verdict::Node)
    );
    assert!(
        r[0].finding.verdict_reason.contains("heads up to 10"),
        "{}",
        r[0].finding.verdict_reason
    );
}

#[test]
fn a_verdict_the_agent_gave_from_its_own_evidence_stands() {
    let mut f = four_at(5);
    f.batch(
        "node-1",
        vec![finding(Finding {
            id: "unreachable-1".into(),
            kind: FindingKind::Unreachable as i32,
            state: FindingState::Open as i32,
            verdict: Verdict::Node as i32,
            verdict_reason: "the node's process is not running".into(),
            ..Default::default()
        })],
    );
    let e = f.of(FindingKind::Unreachable);
    assert_eq!(e[0].finding.verdict(), Verdict::Node);
    assert_eq!(
        e[0].finding.verdict_reason,
        "the node's process is not running"
    );
    // Without one, an unreachable RPC is the monitoring path's.
    f.batch(
        "node-2",
        vec![finding(Finding {
            id: "unreachable-2".into(),
            kind: FindingKind::Unreachable as i32,
            state: FindingState::Open as i32,
            ..Default::default()
        })],
    );
    assert_eq!(
        f.of(FindingKind::Unreachable)[1].finding.verdict(),
        Verdict::MonitoringPath
    );
}

#[test]
fn a_reorg_with_no_peer_to_compare_is_undecided_not_blamed() {
    let mut f = Fleet::new();
    f.mine(&["solo"], 0, 1..=10);
    f.batch(
        "solo",
        vec![header(1, 9), header(1, 10), reorg(0, 1, 8, 10)],
    );
    f.wait(4_000);
    let r = f.of(FindingKind::Reorg);
    assert_eq!(
        r[0].finding.verdict(),
        Verdict::Unspecified,
        "{}",
        r[0].finding.verdict_reason
    );
}

/// Plays one scenario and returns the emitted fleet finding ids, for two
/// aggregators fed the same reports at slightly different times.
fn ids_of(offset_ms: i64) -> Vec<(String, String)> {
    let mut f = Fleet::new();
    f.now += offset_ms;
    f.mine(&FOUR, 0, 1..=7);
    f.wait(3_000);
    f.mine(&["node-1", "node-2"], 1, 8..=10);
    f.mine(&["node-3", "node-4"], 2, 8..=10);
    f.wait(4_000);
    for n in FOUR {
        f.batch(
            n,
            vec![
                header(9, 8),
                header(9, 9),
                header(9, 10),
                header(9, 11),
                reorg(if n < "node-3" { 1 } else { 2 }, 9, 7, 10),
            ],
        );
    }
    f.wait(5_000);
    f.emitted
        .iter()
        .filter(|e| e.scope.starts_with('@') || is_fleet_kind(e.finding.kind()))
        .map(|e| (e.scope.clone(), e.finding.id.clone()))
        .collect()
}

#[test]
fn two_aggregators_fed_the_same_reports_name_fleet_findings_alike() {
    let a = ids_of(0);
    let b = ids_of(370);
    assert!(a.len() >= 4, "{a:?}");
    assert_eq!(a, b);
    assert!(
        a.iter()
            .any(|(s, id)| s == "@devnet" && id == "divergence:@devnet:f7"),
        "{a:?}"
    );
}

#[test]
fn a_restart_in_the_middle_of_an_open_finding_neither_reopens_nor_forgets_it() {
    let mut f = four_at(7);
    f.mine(&["node-2"], 2, 8..=9);
    f.mine(&["node-1", "node-3", "node-4"], 0, 8..=9);
    f.wait(3_000);
    let open = f.of(FindingKind::Divergence)[0].finding.clone();
    // What the store holds: every node's head, headers and findings.
    let mut after = Fleet::new();
    after.now = f.now;
    for n in FOUR {
        let branch = if n == "node-2" { 2 } else { 0 };
        let hashes: Vec<(u64, Vec<u8>)> = (1..=9)
            .map(|h| (h, hash(if h >= 8 { branch } else { 0 }, h)))
            .collect();
        let findings = if n == "node-2" {
            vec![open.clone()]
        } else {
            vec![]
        };
        after.st.load_node(
            n,
            NET,
            "ethereum",
            Some((9, hash(branch, 9))),
            hashes,
            findings,
        );
    }
    after.wait(5_000);
    assert_eq!(after.emitted, vec![], "nothing reopens");
    after.batch(
        "node-2",
        vec![header(0, 8), header(0, 9), reorg(2, 0, 7, 9)],
    );
    after.wait(5_000);
    let div = after.of(FindingKind::Divergence);
    assert_eq!(div.len(), 1);
    assert_eq!(
        (div[0].finding.state(), &div[0].finding.id),
        (FindingState::Resolved, &open.id)
    );
}

/// One node's blocks, each reaching the fleet `delay` ms after the block
/// is made.
fn arrivals() -> impl Strategy<Value = (usize, Vec<Vec<u16>>)> {
    (2usize..6).prop_flat_map(|n| {
        (
            Just(n),
            prop::collection::vec(prop::collection::vec(0u16..900, n), 5..30),
        )
    })
}

proptest! {
    #[test]
    fn nodes_that_report_identical_chains_never_open_a_finding((n, blocks) in arrivals()) {
        let nodes: Vec<String> = (1..=n).map(|i| format!("node-{i}")).collect();
        let mut f = Fleet::new();
        for (i, delays) in blocks.iter().enumerate() {
            let h = i as u64 + 1;
            let mut order: Vec<(u16, &String)> = delays.iter().copied().zip(&nodes).collect();
            order.sort();
            let start = f.now;
            for (d, node) in order {
                let at = start + i64::from(d);
                if at > f.now {
                    f.wait(at - f.now);
                }
                f.batch(node, vec![header(0, h)]);
            }
            let next = start + 1000;
            if next > f.now {
                f.wait(next - f.now);
            }
        }
        f.wait(10_000);
        prop_assert_eq!(&f.emitted, &vec![]);
    }

    #[test]
    fn a_reorg_of_every_node_is_never_blamed_on_one((n, back, delays) in (2usize..7, 1u64..6, prop::collection::vec(0i64..2500, 7))) {
        let (f, _) = network_reorg(n, 20, 20 - back, &delays, None);
        let reorgs = f.of(FindingKind::Reorg);
        prop_assert!(reorgs.iter().all(|e| e.finding.verdict() == Verdict::Network), "{:?}", reorgs);
        prop_assert_eq!(reorgs.iter().filter(|e| e.scope == "@devnet").count(), 1);
        // A node later than the divergence grace diverges meanwhile (its own
        // finding); of the reorg, one alert.
        prop_assert_eq!(reorgs.iter().filter(|e| e.alert).count(), 1, "{:?}", f.alerted());
    }

    #[test]
    fn every_fleet_finding_opens_once_and_resolves_at_most_once(
        forks in prop::collection::vec((0usize..4, 1u8..4, 1u64..4), 0..8)
    ) {
        // Nodes leave for side branches and come back, in any order.
        let mut f = four_at(10);
        let mut top = 10;
        for (node, branch, len) in forks {
            let n = FOUR[node];
            let others: Vec<&str> = FOUR.iter().copied().filter(|x| *x != n).collect();
            f.mine(&[n], branch, top + 1..=top + len);
            f.mine(&others, 0, top + 1..=top + len);
            f.wait(3_000);
            let mut back: Vec<proto::Event> = (top + 1..=top + len + 1).map(|h| header(0, h)).collect();
            back.push(reorg(branch, 0, top, top + len));
            f.batch(n, back);
            f.mine(&others, 0, top + len + 1..=top + len + 1);
            top += len + 1;
            f.wait(4_000);
        }
        let mut state: HashMap<(String, String), Vec<FindingState>> = HashMap::new();
        for e in &f.emitted {
            state.entry((e.scope.clone(), e.finding.id.clone())).or_default().push(e.finding.state());
        }
        for (key, states) in state {
            let ok = matches!(
                states.as_slice(),
                [FindingState::Occurred] | [FindingState::Open] | [FindingState::Open, FindingState::Resolved]
            );
            prop_assert!(ok, "{:?}: {:?}", key, states);
        }
    }
}

#[test]
fn a_pause_of_the_aggregator_is_not_the_agents_silence() {
    let mut f = four_at(5);
    f.cfg.silent_after = Duration::from_secs(10);
    let last = f.now;
    f.st.evaluate(last + 1_000, &f.cfg, &SeenAt(last));
    // Frozen for 40 s: no evaluation, no agent message taken in.
    let ev = f.st.evaluate(last + 41_000, &f.cfg, &SeenAt(last));
    assert_eq!(ev.paused_ms, Some(40_000));
    assert_eq!(
        ev.emits,
        vec![],
        "nobody is silent for the aggregator's pause"
    );
    // Agents that stay away are silent, counted from the thaw.
    let mut emits = Vec::new();
    for t in (42_000..=52_000).step_by(1000) {
        let ev = f.st.evaluate(last + t, &f.cfg, &SeenAt(last));
        assert_eq!(ev.paused_ms, None);
        emits.extend(ev.emits);
    }
    assert_eq!(emits.len(), 4, "{emits:#?}");
    assert!(emits
        .iter()
        .all(|e| e.finding.kind() == FindingKind::AgentSilent));
}

#[test]
fn reorgs_stored_but_not_yet_judged_when_the_aggregator_stopped_are_judged_after_it_starts() {
    // Four agents reported the same reorg; the aggregator stopped before
    // it decided. What the store holds: the headers, and each agent's
    // report as it came (no network, no verdict).
    let mut after = FleetState::new(50_000);
    for n in FOUR {
        let hashes: Vec<(u64, Vec<u8>)> = (1..=10)
            .map(|h| (h, hash(if h >= 8 { 5 } else { 0 }, h)))
            .collect();
        let Some(Kind::Finding(report)) = reorg(0, 5, 7, 10).kind else {
            unreachable!()
        };
        after.load_node(
            n,
            NET,
            "ethereum",
            Some((10, hash(5, 10))),
            hashes,
            vec![report],
        );
    }
    let mut emitted = Vec::new();
    for t in (51_000..=56_000).step_by(1000) {
        emitted.extend(after.evaluate(t, &FleetConfig::default(), &SeenAt(t)).emits);
    }
    let network: Vec<&Emit> = emitted.iter().filter(|e| e.scope == "@devnet").collect();
    assert_eq!(network.len(), 1, "{emitted:#?}");
    assert_eq!(network[0].finding.verdict(), Verdict::Network);
    assert_eq!(emitted.iter().filter(|e| e.alert).count(), 1);
    assert_eq!(
        emitted
            .iter()
            .filter(|e| e.scope != "@devnet" && e.finding.kind() == FindingKind::Reorg)
            .count(),
        4
    );
}

#[test]
fn a_second_episode_at_the_same_anchor_gets_its_own_id_even_after_a_restart() {
    let mut st = FleetState::new(0);
    assert_eq!(
        st.id(FindingKind::Lag, "node-3", "h120".into()),
        "lag:node-3:h120"
    );
    assert_eq!(
        st.id(FindingKind::Lag, "node-3", "h120".into()),
        "lag:node-3:h120:2"
    );
    assert_eq!(
        st.id(FindingKind::Lag, "node-3", "h130".into()),
        "lag:node-3:h130"
    );
    // A restarted aggregator learns the ids from the findings it stored.
    let mut after = FleetState::new(0);
    let stored = |id: &str| Finding {
        id: id.into(),
        kind: FindingKind::Lag as i32,
        state: FindingState::Resolved as i32,
        ..Default::default()
    };
    after.load_node(
        "node-3",
        NET,
        "ethereum",
        None,
        vec![],
        vec![stored("lag:node-3:h120"), stored("lag:node-3:h120:2")],
    );
    after.load_network_finding(
        NET,
        Finding {
            id: "reorg:@devnet:f5:0xfd88f18b782b".into(),
            kind: FindingKind::Reorg as i32,
            state: FindingState::Occurred as i32,
            ..Default::default()
        },
    );
    assert_eq!(
        after.id(FindingKind::Lag, "node-3", "h120".into()),
        "lag:node-3:h120:3"
    );
    assert_eq!(
        after.id(FindingKind::Reorg, "@devnet", "f5:0xfd88f18b782b".into()),
        "reorg:@devnet:f5:0xfd88f18b782b:2"
    );
}

proptest! {
    #[test]
    fn a_restart_anywhere_in_a_network_reorg_changes_no_verdict_and_no_alert(
        (n, back, delays, restart) in (2usize..6, 1u64..5, prop::collection::vec(0i64..2500, 6), 0usize..7)
    ) {
        let (f, _) = network_reorg(n, 12, 12 - back, &delays, Some(restart));
        let reorgs = f.of(FindingKind::Reorg);
        // A node late by more than the divergence grace diverges meanwhile;
        // of the reorg, one alert.
        prop_assert_eq!(reorgs.iter().filter(|e| e.alert).count(), 1, "{:#?}", reorgs);
        prop_assert_eq!(reorgs.iter().filter(|e| e.scope == "@devnet").count(), 1);
        let decided: BTreeSet<&str> = reorgs
            .iter()
            .filter(|e| e.scope != "@devnet")
            .map(|e| e.scope.as_str())
            .collect();
        prop_assert_eq!(decided.len(), n, "every node's reorg is judged: {:#?}", reorgs);
        prop_assert!(reorgs.iter().all(|e| e.finding.verdict() == Verdict::Network), "{:#?}", reorgs);
    }
}

#[test]
fn a_node_judged_before_its_late_peers_reported_is_judged_again_with_them() {
    let mut f = four_at(10);
    let reorged = |f: &mut Fleet, n: &str| {
        f.batch(
            n,
            vec![
                header(5, 8),
                header(5, 9),
                header(5, 10),
                reorg(0, 5, 7, 10),
            ],
        )
    };
    reorged(&mut f, "node-1");
    // The others take longer than the wait for peers.
    f.wait(3_500);
    let early: Vec<Emit> = f.of(FindingKind::Reorg).into_iter().cloned().collect();
    assert_eq!(early.len(), 1);
    assert_eq!(early[0].finding.verdict(), Verdict::Node, "alone so far");
    assert!(early[0].alert);
    for n in ["node-2", "node-3", "node-4"] {
        reorged(&mut f, n);
    }
    f.wait(5_000);
    let network = f
        .of(FindingKind::Reorg)
        .into_iter()
        .find(|e| e.scope == "@devnet")
        .expect("a network reorg")
        .finding
        .clone();
    // The last word on node-1's reorg is the network's.
    let last = f
        .of(FindingKind::Reorg)
        .into_iter()
        .rev()
        .find(|e| e.scope == "node-1")
        .unwrap()
        .clone();
    assert_eq!(last.finding.id, early[0].finding.id);
    assert_eq!(
        last.finding.verdict(),
        Verdict::Network,
        "{:?}",
        last.finding
    );
    assert_eq!(last.finding.cause_id, network.id);
    assert!(!last.alert, "the correction is not alerted again");
}

proptest! {
    #[test]
    fn however_late_the_peers_the_last_word_on_a_network_reorg_is_the_networks(
        (n, delays) in (2usize..6, prop::collection::vec(0i64..10_000, 6))
    ) {
        let (f, nodes) = network_reorg(n, 12, 10, &delays, None);
        // The cause is one network reorg, or a split the late nodes ended
        // (two nodes apart for longer than the divergence grace).
        let reorgs = f.of(FindingKind::Reorg);
        prop_assert!(reorgs.iter().filter(|e| e.scope == "@devnet").count() <= 1, "{:#?}", reorgs);
        for node in &nodes {
            let last = reorgs.iter().rev().find(|e| &e.scope == node).expect("judged");
            prop_assert_eq!(last.finding.verdict(), Verdict::Network, "{:#?}", reorgs);
        }
    }
}

#[test]
fn a_node_that_lags_the_others_is_lagging() {
    let mut f = four_at(10);
    f.mine(&["node-1", "node-2", "node-3"], 0, 11..=30);
    f.wait(2_000);
    let lag = f.of(FindingKind::Lag);
    assert_eq!(lag.len(), 1, "{lag:?}");
    assert_eq!(lag[0].scope, "node-4");
    assert!(lag[0].finding.summary.contains("20 blocks behind"));
}

/// An evaluation names the lags that changed, not every node's each second.
#[test]
fn only_the_lags_that_changed_are_given_for_the_metrics() {
    let mut f = four_at(10);
    let lags = |f: &mut Fleet| {
        f.now += 1000;
        let mut l: Vec<(String, u64)> =
            f.st.evaluate(f.now, &f.cfg, &SeenAt(f.now))
                .lags
                .into_iter()
                .map(|(_, node, behind)| (node, behind))
                .collect();
        l.sort();
        l
    };
    assert_eq!(lags(&mut f), vec![], "four_at already judged all four at 0");
    f.mine(&["node-1", "node-2", "node-3"], 0, 11..=12);
    assert_eq!(lags(&mut f), vec![("node-4".to_string(), 2)]);
    assert_eq!(lags(&mut f), vec![]);
    f.mine(&["node-4"], 0, 11..=12);
    assert_eq!(lags(&mut f), vec![("node-4".to_string(), 0)]);
}

/// A node that serves a chain of its own, well linked and within what its
/// agent finds plausible, but ahead of every other node: its height is not
/// the fleet's, so the honest nodes do not lag; it is ahead alone.
#[test]
fn a_head_no_other_node_corroborates_does_not_make_the_others_lag() {
    let mut f = four_at(10);
    f.mine(&["node-4"], 9, 11..=40);
    for h in 11..=16 {
        f.mine(&["node-1", "node-2", "node-3"], 0, h..=h);
        f.wait(12_000);
    }
    assert_eq!(
        f.of(FindingKind::Lag).len(),
        0,
        "{:?}",
        f.of(FindingKind::Lag)
    );
    let ahead = f.of(FindingKind::AheadAlone);
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    assert_eq!(ahead[0].scope, "node-4");
    assert_eq!(ahead[0].finding.verdict(), Verdict::Unspecified);
    assert!(
        ahead[0].finding.summary.contains("24 blocks above"),
        "{}",
        ahead[0].finding.summary
    );
    let view = f.st.view(NET, f.now, &f.cfg, &SeenAt(f.now));
    assert_eq!(view[0].fleet_head, 16);
    // node-4's blocks differ from the others' at 11..=16 too.
    let rows: Vec<(&str, u64, &str)> = view[0]
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.lag, n.status.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            ("node-1", 0, "ok"),
            ("node-2", 0, "ok"),
            ("node-3", 0, "ok"),
            ("node-4", 0, "diverged")
        ]
    );
    // The others reach its height on their own chain: its blocks differ.
    f.mine(&["node-1", "node-2", "node-3"], 0, 17..=40);
    f.wait(3_000);
    let ahead = f.of(FindingKind::AheadAlone);
    assert_eq!(ahead.len(), 2, "{ahead:?}");
    assert_eq!(ahead[1].finding.state(), FindingState::Resolved);
    let div = f.of(FindingKind::Divergence);
    assert_eq!((div.len(), div[0].scope.as_str()), (1, "node-4"), "{div:?}");
}

/// A reference node is trusted alone: ahead of the others, they lag it.
#[test]
fn a_reference_node_ahead_alone_is_the_fleet_head() {
    let mut f = four_at(10);
    f.cfg.reference_nodes = vec!["node-4".into()];
    f.mine(&["node-4"], 0, 11..=30);
    f.wait(2_000);
    let lag = f.of(FindingKind::Lag);
    assert_eq!(lag.len(), 3, "{lag:?}");
    assert_eq!(f.of(FindingKind::AheadAlone).len(), 0);
}

/// Of two nodes, which one is wrong cannot be told without a reference:
/// the one ahead is `ahead`, undecided, and the other does not lag.
#[test]
fn of_two_nodes_the_one_ahead_alone_is_undecided() {
    let mut f = Fleet::new();
    f.mine(&["node-1", "node-2"], 0, 1..=10);
    f.mine(&["node-2"], 0, 11..=30);
    f.wait(61_000);
    assert_eq!(f.of(FindingKind::Lag).len(), 0);
    let ahead = f.of(FindingKind::AheadAlone);
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    assert!(ahead[0].finding.verdict_reason.contains("reference node"));
    let view = f.st.view(NET, f.now, &f.cfg, &SeenAt(f.now));
    let rows: Vec<(&str, u64, &str)> = view[0]
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.lag, n.status.as_str()))
        .collect();
    assert_eq!(rows, [("node-1", 0, "ok"), ("node-2", 0, "ahead")]);
}

/// An aggregator that comes back gets each agent's backlog: a node whose
/// agent still has events pending is not judged on the height it has
/// reached so far, so the lag opens at the height the node really stopped
/// at, whatever order the backlogs arrive in.
#[test]
fn a_node_whose_backlog_is_still_arriving_is_not_judged_for_lag() {
    let mut f = four_at(10);
    f.mine(&["node-1", "node-2", "node-4"], 0, 11..=20);
    // node-3 reached 12 before it stopped; its backlog has come up to 11.
    f.batch("node-3", vec![header(0, 11)]);
    f.st.set_pending("node-3", 1);
    f.wait(2_000);
    assert_eq!(
        f.of(FindingKind::Lag).len(),
        0,
        "{:?}",
        f.of(FindingKind::Lag)
    );
    f.batch("node-3", vec![header(0, 12)]);
    f.st.set_pending("node-3", 0);
    f.wait(1_000);
    let lag = f.of(FindingKind::Lag);
    assert_eq!(lag.len(), 1, "{lag:?}");
    assert_eq!(lag[0].finding.id, "lag:node-3:h12");
}

/// An aggregator that stopped while node-2 diverged comes back to the
/// backlogs of all three nodes, in any order: node-2 rejoined meanwhile, so
/// its divergence resolves.
#[test]
fn a_divergence_that_ended_while_the_aggregator_was_down_resolves_after_it() {
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for order in orders {
        let mut f = Fleet::new();
        f.mine(&["node-1", "node-2", "node-3"], 0, 1..=5);
        f.mine(&["node-1", "node-3"], 0, 6..=7);
        f.mine(&["node-2"], 2, 6..=7);
        f.wait(3_000);
        assert_eq!(f.of(FindingKind::Divergence).len(), 1);
        f.restart();
        let backlogs: [(&str, Vec<proto::Event>); 3] = [
            ("node-1", (8..=16).map(|h| header(0, h)).collect()),
            (
                "node-2",
                [6, 7, 8]
                    .into_iter()
                    .map(|h| header(0, h))
                    .chain([reorg(2, 0, 5, 7)])
                    .chain((9..=16).map(|h| header(0, h)))
                    .collect(),
            ),
            ("node-3", vec![header(0, 8)]),
        ];
        for i in order {
            let (node, events) = backlogs[i].clone();
            f.batch(node, events);
            f.wait(1_000);
        }
        f.wait(5_000);
        let states: Vec<FindingState> = f
            .of(FindingKind::Divergence)
            .iter()
            .map(|e| e.finding.state())
            .collect();
        assert_eq!(
            states,
            [FindingState::Open, FindingState::Resolved],
            "order {order:?}"
        );
    }
}

#[test]
fn an_agent_that_connects_and_dies_before_its_first_batch_is_silent() {
    let cfg = FleetConfig {
        silent_after: Duration::from_secs(2),
        ..Default::default()
    };
    let start = 1_700_000_000_000;
    let mut st = FleetState::new(start);
    st.know("node-1", "devnet", "ethereum");
    let mut emits = Vec::new();
    for t in (1_000..=4_000).step_by(1000) {
        emits.extend(st.evaluate(start + t, &cfg, &SeenAt(start)).emits);
    }
    assert_eq!(emits.len(), 1, "{emits:#?}");
    assert_eq!(emits[0].finding.kind(), FindingKind::AgentSilent);
    assert_eq!(emits[0].scope, "node-1");
    assert_eq!(emits[0].finding.network, "devnet");
}
