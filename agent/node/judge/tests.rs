//! The agent's rules, tried on recorded sequences: chains as a node serves
//! them, polls, clock ticks and host samples, with the time passed in.

use super::*;
use crate::chain::ethereum::{parse_block, EthereumSource};
use crate::chain::rpc::JsonRpcClient;
use crate::model::Hash;
use proptest::prelude::*;

/// A chain with no checks of its own.
struct NoChecks;

impl HeaderChecks for NoChecks {
    fn check_fields(&self, _: &Header) -> Vec<String> {
        Vec::new()
    }
    fn verify(&self, _: &Header) -> Verification {
        Verification::NotSupported
    }
    fn final_on_commit(&self) -> bool {
        false
    }
}

fn hash(branch: u8, height: u64) -> Hash {
    let mut v = vec![branch; 24];
    v.extend_from_slice(&height.to_be_bytes());
    Hash(v)
}

/// Block `height` of `branch`, which shares the blocks up to `fork` with
/// branch 0.
fn block(branch: u8, fork: u64, height: u64) -> Header {
    let on = |h: u64| if h <= fork { 0 } else { branch };
    Header {
        height,
        hash: hash(on(height), height),
        parent_hash: hash(on(height.wrapping_sub(1)), height.wrapping_sub(1)),
        timestamp: 1_700_000_000 + height as i64,
        raw: None,
    }
}

fn blocks(branch: u8, fork: u64, heights: std::ops::RangeInclusive<u64>) -> Vec<Header> {
    heights.map(|h| block(branch, fork, h)).collect()
}

fn rules() -> Rules {
    Rules {
        validate: ValidateConfig {
            expected_block_time: Duration::from_secs(1),
            stall_multiple: 3.0,
            max_reorg_depth: 64,
            ..ValidateConfig::default()
        },
        host: HostConfig::default(),
        poll_interval: Duration::from_secs(1),
    }
}

fn at(ms: u64) -> Now {
    Now {
        wall_ms: 1_700_000_000_000 + ms as i64,
        mono_ms: ms,
    }
}

fn polled(headers: Vec<Header>) -> Input {
    Input::Polled {
        chain: Some(ChainStep {
            headers,
            linked: true,
        }),
        status: None,
        status_due: false,
    }
}

/// What a sequence of (time, input) produced: kind and state of each
/// finding, and every outcome.
struct Run {
    judge: Judge,
    outcomes: Vec<Outcome>,
}

impl Run {
    fn new() -> Run {
        Run {
            judge: Judge::new(rules(), State::default()),
            outcomes: Vec::new(),
        }
    }

    fn feed(&mut self, ms: u64, input: Input) -> &Outcome {
        let out = self.judge.step(input, at(ms), &NoChecks).unwrap();
        self.outcomes.push(out);
        self.outcomes.last().unwrap()
    }

    fn findings(&self) -> Vec<&Finding> {
        self.outcomes.iter().flat_map(|o| o.findings()).collect()
    }

    fn kinds(&self) -> Vec<(FindingKind, FindingState)> {
        self.findings()
            .iter()
            .map(|f| (f.kind(), f.state()))
            .collect()
    }
}

/// Mines `1..=n` on branch 0, one block a second, with a tick between.
fn mined(n: u64) -> Run {
    let mut run = Run::new();
    for h in 1..=n {
        run.feed(h * 1000, polled(vec![block(0, 0, h)]));
        run.feed(h * 1000 + 500, Input::Tick);
    }
    run
}

#[test]
fn a_quiet_chain_raises_nothing() {
    let run = mined(30);
    assert_eq!(run.kinds(), vec![]);
    assert_eq!(run.judge.state.head().map(|h| h.height), Some(30));
}

#[test]
fn a_reorg_at_the_same_height_names_the_fork_point_and_both_hashes() {
    let mut run = mined(10);
    let out = run.feed(11_000, polled(blocks(1, 7, 8..=10))).clone();
    let f: Vec<&Finding> = out.findings().collect();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind(), FindingKind::Reorg);
    assert_eq!(f[0].fork_point, Some(7));
    assert_eq!(f[0].depth, Some(3));
    assert_eq!(f[0].replaced_hash, hash(0, 8).0);
    assert_eq!(f[0].new_hash, hash(1, 8).0);
    assert_eq!(f[0].severity(), Severity::Warning);
    assert_eq!(out.truncate_above, None);
}

#[test]
fn a_head_that_went_lower_and_then_built_other_blocks_is_a_reorg() {
    // Every node of a network rolled back five blocks and then built new
    // ones: a regression first, then the replaced hashes show.
    let mut run = mined(10);
    let out = run.feed(11_000, polled(vec![block(0, 0, 5)])).clone();
    assert_eq!(
        out.findings().map(|f| f.kind()).collect::<Vec<_>>(),
        vec![FindingKind::HeightRegression]
    );
    assert_eq!(out.truncate_above, Some(5));
    assert_eq!(
        out.retracted
            .as_ref()
            .map(|r| r.iter().map(|h| h.height).collect::<Vec<_>>()),
        Some((6..=10).collect())
    );
    let out = run.feed(12_000, polled(blocks(1, 5, 6..=7))).clone();
    let f: Vec<&Finding> = out.findings().collect();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind(), FindingKind::Reorg);
    assert_eq!((f[0].fork_point, f[0].depth), (Some(5), Some(5)));
    assert_eq!(f[0].height, 10, "the old head");
    assert_eq!(f[0].replaced_hash, hash(0, 6).0);
    assert!(
        f[0].summary.contains("blocks 6..=10 replaced"),
        "{}",
        f[0].summary
    );
    assert_eq!(out.retracted, Some(vec![]), "the reorg accounts for them");
}

#[test]
fn a_lower_head_with_another_hash_is_one_reorg_not_a_regression() {
    let mut run = mined(10);
    // The walk back found the fork point 3 below the new head 6.
    let out = run.feed(11_000, polled(blocks(1, 3, 4..=6))).clone();
    let kinds: Vec<FindingKind> = out.findings().map(|f| f.kind()).collect();
    assert_eq!(kinds, vec![FindingKind::Reorg]);
    let f = out.findings().next().unwrap();
    assert_eq!((f.fork_point, f.depth), (Some(3), Some(7)));
    assert_eq!(f.severity(), Severity::Critical, "depth 7");
    assert!(f.summary.contains("4 blocks lower"), "{}", f.summary);
    assert_eq!(out.truncate_above, Some(6));
}

#[test]
fn a_regression_taken_back_at_the_same_hashes_is_no_reorg() {
    let mut run = mined(10);
    run.feed(11_000, polled(vec![block(0, 0, 7)]));
    let out = run.feed(12_000, polled(blocks(0, 0, 8..=12))).clone();
    assert_eq!(out.findings().count(), 0, "{:?}", out.events);
    assert_eq!(out.retracted, Some(vec![]));
    assert_eq!(
        run.kinds(),
        vec![(FindingKind::HeightRegression, FindingState::Occurred)]
    );
}

#[test]
fn a_restart_between_the_regression_and_the_new_blocks_still_sees_the_reorg() {
    let mut run = mined(10);
    let out = run.feed(11_000, polled(vec![block(0, 0, 5)])).clone();
    // What the store holds after that commit.
    let retracted = out.retracted.clone().unwrap();
    let stored: Vec<Header> = blocks(0, 0, 1..=5);
    let mut after = Judge::new(rules(), State::restore(vec![], stored, retracted, at(0)));
    let out = after
        .step(polled(blocks(1, 5, 6..=6)), at(1000), &NoChecks)
        .unwrap();
    let f: Vec<&Finding> = out.findings().collect();
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].kind(), f[0].depth), (FindingKind::Reorg, Some(5)));
}

#[test]
fn a_stall_opens_after_the_multiple_and_resolves_on_the_next_block() {
    // The last block came at 5 s.
    let mut run = mined(5);
    for ms in (5_750..=7_750).step_by(250) {
        run.feed(ms, Input::Tick);
    }
    assert_eq!(run.kinds(), vec![], "2.75 s of 3");
    for ms in (8_000..=9_250).step_by(250) {
        run.feed(ms, Input::Tick);
    }
    assert_eq!(run.kinds(), vec![(FindingKind::Stall, FindingState::Open)]);
    run.feed(9_500, polled(vec![block(0, 0, 6)]));
    assert_eq!(
        run.kinds(),
        vec![
            (FindingKind::Stall, FindingState::Open),
            (FindingKind::Stall, FindingState::Resolved)
        ]
    );
    let f = run.findings();
    assert_eq!(f[0].id, f[1].id, "one finding, opened and resolved");
}

#[test]
fn an_agent_that_did_not_run_says_so_and_does_not_blame_its_node() {
    let mut run = mined(5);
    // Frozen for 10 s right after a tick; the node went on mining.
    run.feed(5_750, Input::Tick);
    let out = run.feed(15_750, Input::Tick).clone();
    let f: Vec<&Finding> = out.findings().collect();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind(), FindingKind::AgentPaused);
    assert_eq!(f[0].verdict(), Verdict::MonitoringPath);
    assert!(f[0].summary.contains("10.0s"), "{}", f[0].summary);
    // The next poll catches up; ticks after it raise nothing.
    run.feed(15_800, polled(blocks(0, 0, 6..=15)));
    for ms in (16_000..=17_000).step_by(250) {
        run.feed(ms, Input::Tick);
    }
    assert_eq!(
        run.kinds(),
        vec![(FindingKind::AgentPaused, FindingState::Occurred)]
    );
}

#[test]
fn a_node_that_truly_stops_during_a_pause_still_stalls_afterwards() {
    // The last block came at 5 s; the agent ran until 5.75 s and again
    // from 15.75 s.
    let mut run = mined(5);
    run.feed(5_750, Input::Tick);
    run.feed(15_750, Input::Tick);
    // No block since: 0.75 s before the pause and 2 s after it.
    for ms in (16_000..=17_750).step_by(250) {
        run.feed(ms, Input::Tick);
    }
    assert!(!run.judge.state.is_open(FindingKind::Stall));
    run.feed(18_000, Input::Tick);
    assert!(run.judge.state.is_open(FindingKind::Stall));
}

#[test]
fn an_unreachable_node_gets_the_verdict_its_evidence_supports() {
    let watched = HostConfig {
        node_process: Some("geth".into()),
        ..HostConfig::default()
    };
    let sample = |running: bool| proto::HostSample {
        node_rss_bytes: running.then_some(1 << 30),
        ..Default::default()
    };
    // (cause, host config, last host sample) → verdict, words in the reason
    let cases = [
        (
            Cause::Refused,
            HostConfig::default(),
            None,
            Verdict::MonitoringPath,
            "host.node_process",
        ),
        (
            Cause::TimedOut,
            HostConfig::default(),
            None,
            Verdict::MonitoringPath,
            "cannot tell",
        ),
        (
            Cause::Refused,
            watched.clone(),
            None,
            Verdict::MonitoringPath,
            "cannot tell",
        ),
        (
            Cause::Refused,
            watched.clone(),
            Some(sample(false)),
            Verdict::Node,
            "not running",
        ),
        (
            Cause::TimedOut,
            watched.clone(),
            Some(sample(false)),
            Verdict::Node,
            "not running",
        ),
        (
            Cause::Refused,
            watched.clone(),
            Some(sample(true)),
            Verdict::Node,
            "nothing accepts",
        ),
        (
            Cause::TimedOut,
            watched.clone(),
            Some(sample(true)),
            Verdict::Node,
            "does not answer in time",
        ),
        (
            Cause::Other,
            watched.clone(),
            Some(sample(true)),
            Verdict::MonitoringPath,
            "between the agent and the node",
        ),
        (
            Cause::Denied(401),
            watched.clone(),
            Some(sample(true)),
            Verdict::MonitoringPath,
            "credentials",
        ),
        (
            Cause::Denied(403),
            HostConfig::default(),
            None,
            Verdict::MonitoringPath,
            "HTTP 403",
        ),
    ];
    for (cause, host, last, verdict, words) in cases {
        let mut judge = Judge::new(Rules { host, ..rules() }, State::default());
        if let Some(s) = last {
            judge.step(Input::Host(s), at(0), &NoChecks).unwrap();
        }
        let input = Input::Unreachable {
            error: "x".into(),
            cause,
        };
        let out = judge.step(input, at(1000), &NoChecks).unwrap();
        let f = out.findings().next().expect("unreachable opens");
        assert_eq!(f.kind(), FindingKind::Unreachable);
        assert_eq!(f.verdict(), verdict, "{cause:?}: {}", f.verdict_reason);
        assert!(
            f.verdict_reason.contains(words),
            "{cause:?}: {}",
            f.verdict_reason
        );
        assert!(out.status_due);
        // It resolves at the next poll that works, once.
        let out = judge
            .step(polled(vec![block(0, 0, 1)]), at(2000), &NoChecks)
            .unwrap();
        assert_eq!(
            out.findings()
                .map(|f| (f.kind(), f.state()))
                .collect::<Vec<_>>(),
            vec![(FindingKind::Unreachable, FindingState::Resolved)]
        );
    }
}

#[test]
fn headers_that_do_not_link_within_the_depth_are_a_linkage_finding() {
    let mut run = mined(3);
    let out = run
        .feed(
            4000,
            Input::Polled {
                chain: Some(ChainStep {
                    headers: blocks(2, 0, 4..=4),
                    linked: false,
                }),
                status: None,
                status_due: false,
            },
        )
        .clone();
    assert_eq!(
        out.findings().map(|f| f.kind()).collect::<Vec<_>>(),
        vec![FindingKind::Linkage]
    );
}

#[test]
fn a_restart_in_the_middle_of_an_open_finding_neither_reopens_nor_forgets_it() {
    let mut run = mined(5);
    for ms in (5_750..=9_250).step_by(250) {
        run.feed(ms, Input::Tick);
    }
    let open: Vec<Finding> = run
        .findings()
        .into_iter()
        .filter(|f| f.state() == FindingState::Open)
        .cloned()
        .collect();
    assert_eq!(open.len(), 1);
    let mut after = Judge::new(
        rules(),
        State::restore(open.clone(), blocks(0, 0, 1..=5), vec![], at(0)),
    );
    for ms in (250..=5_000).step_by(250) {
        let out = after.step(Input::Tick, at(ms), &NoChecks).unwrap();
        assert_eq!(out.findings().count(), 0, "reopened: {:?}", out.events);
    }
    let out = after
        .step(polled(vec![block(0, 0, 6)]), at(5_250), &NoChecks)
        .unwrap();
    let f: Vec<&Finding> = out.findings().collect();
    assert_eq!(f.len(), 1);
    assert_eq!(
        (f[0].state(), &f[0].id),
        (FindingState::Resolved, &open[0].id)
    );
}

#[test]
fn a_status_interval_judges_the_rpc_window() {
    let mut judge = Judge::new(rules(), State::default());
    let mut out = Outcome::default();
    let failing = RpcInterval {
        all: crate::proto::LatencySummary {
            count: 30,
            ..Default::default()
        },
        errors: 6,
        methods: vec![],
    };
    let status = judge.end_interval(failing.clone(), at(1000), &mut out);
    assert!(status.reachable);
    assert_eq!(
        out.findings().map(|f| f.kind()).collect::<Vec<_>>(),
        vec![FindingKind::RpcErrors]
    );
    // Healthy intervals bring the rate below 5 %.
    let healthy = RpcInterval {
        errors: 0,
        all: crate::proto::LatencySummary {
            count: 200,
            ..Default::default()
        },
        ..failing
    };
    let mut out = Outcome::default();
    judge.end_interval(healthy, at(2000), &mut out);
    assert_eq!(
        out.findings()
            .map(|f| (f.kind(), f.state()))
            .collect::<Vec<_>>(),
        vec![(FindingKind::RpcErrors, FindingState::Resolved)]
    );
}

/// What a node can do to its chain between two polls.
#[derive(Debug, Clone)]
enum Move {
    /// Mine `n` blocks on the current branch.
    Mine(u64),
    /// Switch to a new branch forking `back` blocks below the head, and
    /// mine `n` on it.
    Fork { back: u64, n: u64 },
    /// Go back `n` blocks (same hashes below).
    Regress(u64),
    /// Let this many ms pass with ticks.
    Wait(u64),
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    let one = prop_oneof![
        4 => (1u64..4).prop_map(Move::Mine),
        1 => (1u64..6, 1u64..6).prop_map(|(back, n)| Move::Fork { back, n }),
        1 => (1u64..5).prop_map(Move::Regress),
        2 => (100u64..5000).prop_map(Move::Wait),
    ];
    prop::collection::vec(one, 1..40)
}

/// A node's chain as a list of blocks, and what a poll of it brings: the
/// headers above `known` back to where they link, as Ingest walks.
struct Node {
    chain: Vec<Header>,
    branches: u8,
    /// What the node handed the agent at each height, last time; heights
    /// above a lower head stay until served again, or until a reorg
    /// accounts for them.
    served: BTreeMap<u64, Hash>,
}

impl Node {
    fn new() -> Node {
        Node {
            chain: vec![block(0, 0, 0)],
            branches: 0,
            served: BTreeMap::new(),
        }
    }

    /// Records what one poll handed over; true when it replaced a block the
    /// node had served before at the same height.
    fn served(&mut self, step: &ChainStep) -> bool {
        let replaced = step
            .headers
            .iter()
            .any(|h| self.served.get(&h.height).is_some_and(|s| *s != h.hash));
        if replaced {
            self.served.split_off(&(self.top() + 1));
        }
        for h in &step.headers {
            self.served.insert(h.height, h.hash.clone());
        }
        replaced
    }

    fn top(&self) -> u64 {
        self.chain.last().unwrap().height
    }

    fn mine(&mut self, n: u64) {
        for _ in 0..n {
            let p = self.chain.last().unwrap().clone();
            let branch = p.hash.0[0];
            self.chain.push(Header {
                height: p.height + 1,
                hash: hash(branch, p.height + 1),
                parent_hash: p.hash.clone(),
                timestamp: p.timestamp + 1,
                raw: None,
            });
        }
    }

    fn apply(&mut self, m: &Move) {
        match *m {
            Move::Mine(n) => self.mine(n),
            Move::Fork { back, n } => {
                let keep = self.top().saturating_sub(back).max(1);
                self.chain.truncate(keep as usize + 1);
                self.branches = self.branches.wrapping_add(1).max(1);
                let p = self.chain.last().unwrap().clone();
                let b = self.branches;
                self.chain.push(Header {
                    height: p.height + 1,
                    hash: hash(b, p.height + 1),
                    parent_hash: p.hash.clone(),
                    timestamp: p.timestamp + 1,
                    raw: None,
                });
                self.mine(n.saturating_sub(1));
            }
            Move::Regress(n) => {
                let keep = self.top().saturating_sub(n).max(1);
                self.chain.truncate(keep as usize + 1);
            }
            Move::Wait(_) => {}
        }
    }

    /// What Ingest would hand over, given the headers stored at each height.
    fn poll(&self, stored: &BTreeMap<u64, Header>) -> Option<ChainStep> {
        let head = self.chain.last().unwrap();
        let known = stored.values().next_back();
        if known.is_some_and(|k| k.hash == head.hash) {
            return None;
        }
        let from = match known {
            Some(k) if head.height > k.height => k.height + 1,
            Some(_) => head.height,
            None => head.height,
        };
        let mut headers: Vec<Header> = self.chain[from as usize..].to_vec();
        while let Some(lowest) = headers.first() {
            if lowest.height == 0 {
                break;
            }
            match stored.get(&(lowest.height - 1)) {
                Some(s) if s.hash != lowest.parent_hash => {
                    headers.insert(0, self.chain[lowest.height as usize - 1].clone());
                }
                _ => break,
            }
        }
        Some(ChainStep {
            headers,
            linked: true,
        })
    }
}

/// Applies an outcome to a model of what the store holds.
#[derive(Default, Clone)]
struct Stored {
    headers: BTreeMap<u64, Header>,
    open: BTreeMap<i32, Finding>,
    retracted: Vec<Header>,
}

impl Stored {
    fn apply(&mut self, out: &Outcome) {
        if let Some(top) = out.truncate_above {
            self.headers.split_off(&(top + 1));
        }
        for h in &out.headers {
            self.headers.insert(h.height, h.clone());
        }
        if let Some(r) = &out.retracted {
            self.retracted = r.clone();
        }
        for f in out.findings() {
            match f.state() {
                FindingState::Open => {
                    self.open.insert(f.kind, f.clone());
                }
                FindingState::Resolved => {
                    self.open.remove(&f.kind);
                }
                _ => {}
            }
        }
    }

    fn restore(&self, depth: u64, now: Now) -> State {
        let top = self.headers.keys().next_back().copied().unwrap_or(0);
        State::restore(
            self.open.values().cloned().collect(),
            self.headers
                .range(top.saturating_sub(depth)..)
                .map(|(_, h)| h.clone())
                .collect(),
            self.retracted.clone(),
            now,
        )
    }
}

type Seen = Vec<(FindingKind, FindingState, Option<u64>, Option<u64>)>;

/// Runs `moves` against one node, polled after each; with `restart_at`,
/// the judge is rebuilt from the stored model before that move. Returns
/// every finding as (kind, state, fork point, depth), and how many polls
/// replaced blocks the node had served.
fn play(moves: &[Move], restart_at: Option<usize>) -> (Seen, usize) {
    let mut node = Node::new();
    node.mine(3);
    let mut judge = Judge::new(rules(), State::default());
    let mut stored = Stored::default();
    let mut ms = 0u64;
    let mut seen = Vec::new();
    let mut replacing = 0;
    let mut feed = |judge: &mut Judge, stored: &mut Stored, input: Input, ms: u64| {
        let out = judge.step(input, at(ms), &NoChecks).unwrap();
        stored.apply(&out);
        for f in out.findings() {
            seen.push((f.kind(), f.state(), f.fork_point, f.depth));
        }
    };
    for (i, m) in moves.iter().enumerate() {
        if restart_at == Some(i) {
            judge = Judge::new(rules(), stored.restore(64, at(ms)));
        }
        node.apply(m);
        let wait = match m {
            Move::Wait(w) => *w,
            _ => 300,
        };
        let end = ms + wait;
        while ms < end {
            ms += 250.min(end - ms);
            feed(&mut judge, &mut stored, Input::Tick, ms);
        }
        let step = node.poll(&stored.headers);
        if let Some(step) = &step {
            replacing += usize::from(node.served(step));
        }
        feed(
            &mut judge,
            &mut stored,
            Input::Polled {
                chain: step,
                status: None,
                status_due: false,
            },
            ms,
        );
    }
    (seen, replacing)
}

proptest! {
    #[test]
    fn every_finding_that_opens_resolves_at_most_once(moves in moves()) {
        let (seen, _) = play(&moves, None);
        let mut open: BTreeMap<FindingKind, usize> = BTreeMap::new();
        for (kind, state, _, _) in &seen {
            match state {
                FindingState::Open => {
                    let n = open.entry(*kind).or_default();
                    prop_assert_eq!(*n, 0, "{:?} opened twice: {:?}", kind, seen);
                    *n += 1;
                }
                FindingState::Resolved => {
                    let n = open.entry(*kind).or_default();
                    prop_assert_eq!(*n, 1, "{:?} resolved while not open: {:?}", kind, seen);
                    *n -= 1;
                }
                _ => {}
            }
        }
    }

    #[test]
    fn every_replaced_block_is_one_reorg_and_nothing_else_is(moves in moves()) {
        let (seen, replacing) = play(&moves, None);
        let reorgs = seen.iter().filter(|(k, ..)| *k == FindingKind::Reorg).count();
        prop_assert_eq!(reorgs, replacing, "{:?}", seen);
        prop_assert!(!seen.iter().any(|(k, ..)| *k == FindingKind::Linkage), "{:?}", seen);
    }

    #[test]
    fn a_restart_from_the_store_changes_no_chain_outcome(moves in moves(), at in 0usize..40) {
        let chain = |(seen, _): (Seen, usize)| {
            seen.into_iter()
                .filter(|(k, ..)| matches!(k, FindingKind::Reorg | FindingKind::HeightRegression | FindingKind::Linkage))
                .collect::<Vec<_>>()
        };
        let straight = chain(play(&moves, None));
        let restarted = chain(play(&moves, Some(at.min(moves.len()))));
        prop_assert_eq!(straight, restarted);
    }
}

#[test]
fn a_fork_while_polled_every_time_is_one_reorg_per_fork() {
    let (seen, replacing) = play(
        &[
            Move::Mine(5),
            Move::Fork { back: 2, n: 3 },
            Move::Mine(2),
            Move::Regress(3),
            Move::Fork { back: 1, n: 4 },
        ],
        None,
    );
    assert_eq!(replacing, 2);
    let reorgs: Vec<_> = seen
        .iter()
        .filter(|(k, ..)| *k == FindingKind::Reorg)
        .collect();
    assert_eq!(reorgs.len(), 2, "{seen:?}");
}

fn anvil_header() -> (EthereumSource, Header) {
    let source = EthereumSource::new(JsonRpcClient::new(
        "http://127.0.0.1:1",
        Duration::from_secs(1),
        1 << 20,
        crate::latency::RpcTimings::new(),
    ));
    let block =
        serde_json::from_str(include_str!("../../chain/testdata/anvil-prague-block.json")).unwrap();
    (source, parse_block(&block).unwrap())
}

#[test]
fn timestamps_are_checked_against_the_clock_and_the_parent() {
    let (source, h) = anvil_header();
    let tolerance = Duration::from_secs(15);
    let check = |level, parent: Option<&Header>, now: i64| {
        header_problems(level, &source, &h, parent, now, tolerance)
    };
    let t = h.timestamp;
    let mut parent = h.clone();
    assert!(check(ValidationLevel::Full, Some(&parent), t).is_empty());
    // Equal to the parent's is allowed; one second later is not.
    parent.timestamp = t + 1;
    let p = check(ValidationLevel::Comprehensive, Some(&parent), t);
    assert_eq!(p.len(), 1);
    assert!(p[0].text.contains("before its parent's"), "{p:?}");
    assert!(!p[0].critical);
    // 15 s ahead of the clock is tolerated, 16 s is not.
    assert!(check(ValidationLevel::Comprehensive, None, t - 15).is_empty());
    let p = check(ValidationLevel::Comprehensive, None, t - 16);
    assert!(
        p[0].text.contains("16s ahead of this host's clock"),
        "{p:?}"
    );
    // Levels below comprehensive look at none of it.
    assert!(check(ValidationLevel::Standard, Some(&parent), t - 100).is_empty());
}

#[test]
fn only_level_full_recomputes_the_hash() {
    let (source, mut h) = anvil_header();
    h.hash.0[0] ^= 1;
    assert!(header_problems(
        ValidationLevel::Comprehensive,
        &source,
        &h,
        None,
        h.timestamp,
        Duration::from_secs(15)
    )
    .is_empty());
    let p = header_problems(
        ValidationLevel::Full,
        &source,
        &h,
        None,
        h.timestamp,
        Duration::from_secs(15),
    );
    assert_eq!(p.len(), 1);
    assert!(
        p[0].critical && p[0].text.contains("does not match"),
        "{p:?}"
    );
}
