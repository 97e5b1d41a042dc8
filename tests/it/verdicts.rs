//! Whose fault, decided from evidence, on real anvil fleets: four nodes
//! from one genesis, mined explicitly, each with its agent, and one
//! aggregator whose alerts all go to a recording webhook. Each case checks
//! the verdict, its reason and how many alerts were sent; the time to
//! detect is printed (`cargo test --test it verdicts -- --nocapture`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost::proto::{
    query_client::QueryClient, FindingKind, FindingState, FleetRequest, ListFindingsRequest,
    NodeFinding, Verdict,
};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::fleet::Fleet;
use crate::harness::{
    http_fixture, wait_for, Agent, AgentOptions, Aggregator, Anvil, Miner, Recorder, World,
};
use crate::spine::wait_at_head;

const WAIT: Duration = Duration::from_secs(40);
const GENESIS: u64 = 1_700_000_000;

/// Four anvils from one genesis with an agent each, one aggregator, and
/// the webhook that receives every alert.
struct Four {
    fleet: Fleet,
    hook: Recorder,
}

impl std::ops::Deref for Four {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        &self.fleet
    }
}

/// Blocks come when a test mines them: no stall while it waits.
fn mined_by_hand() -> AgentOptions {
    AgentOptions {
        block_time: "60s",
        ..Default::default()
    }
}

impl Four {
    async fn start() -> Four {
        let (hook, url) = Recorder::start().await;
        let extra = format!(
            "[fleet]\nsilent_after = \"30s\"\n[[alert]]\nkind = \"webhook\"\nurl = \"{url}/hook\"\n"
        );
        let fleet = Fleet::of(4, &extra, mined_by_hand).await;
        Four { fleet, hook }
    }

    async fn snapshot(&self, i: usize) -> Value {
        self.anvils[i].rpc("evm_snapshot", json!([])).await
    }

    async fn revert(&self, i: usize, id: &Value) {
        let ok = self.anvils[i].rpc("evm_revert", json!([id])).await;
        assert_eq!(ok, json!(true), "anvil-{} reverted", i + 1);
    }

    async fn copy_blocks(&self, to: usize, from: usize, heights: std::ops::RangeInclusive<u64>) {
        self.anvils[to]
            .copy_blocks(&self.anvils[from], heights)
            .await;
    }

    async fn findings(&self) -> Vec<NodeFinding> {
        self.q
            .clone()
            .list_findings(ListFindingsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .findings
    }

    /// Waits for a finding of `kind` on `node` ("" for the network) in
    /// `state`, and returns it.
    async fn wait(
        &self,
        what: &str,
        kind: FindingKind,
        node: &str,
        state: FindingState,
    ) -> outpost::proto::Finding {
        let logs = self.logs();
        let logs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
        // The agent's own report is stored at once; the fleet's verdict on
        // it may wait for the peers.
        wait_for(what, WAIT, &logs, || async {
            self.findings().await.into_iter().find_map(|nf| {
                let f = nf.finding?;
                (nf.node_id == node
                    && f.kind() == kind
                    && f.state() == state
                    && f.verdict() != Verdict::Unspecified)
                    .then_some(f)
            })
        })
        .await
    }

    /// The alerts received: (node or "" for the network, kind, state, id).
    fn alerts(&self) -> Vec<(String, String, String, String)> {
        self.hook
            .bodies()
            .iter()
            .map(|v| {
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                (s("node_id"), s("kind"), s("state"), s("id"))
            })
            .collect()
    }
}

fn detected(case: &str, since: Instant) {
    let s = since.elapsed().as_secs_f64();
    println!("detection: {case}: {s:.1} s");
}

#[tokio::test]
async fn a_quiet_fleet_mined_together_for_a_minute_raises_nothing() {
    let f = Four::start().await;
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(60) {
        i += 1;
        f.mine_at(&[0, 1, 2, 3], GENESIS + 12 * i).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    f.all_at_head().await;
    // Longer than any verdict waits for its peers.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let findings = f.findings().await;
    assert!(findings.is_empty(), "{i} blocks: {findings:#?}");
    assert_eq!(f.alerts(), vec![], "no alert at all");
}

#[tokio::test]
async fn a_node_alone_on_a_side_branch_that_rejoins_is_the_nodes_reorg() {
    let f = Four::start().await;
    for i in 1..=5 {
        f.mine_at(&[0, 1, 2, 3], GENESIS + 12 * i).await;
    }
    f.all_at_head().await;
    let before = f.snapshot(1).await;
    // Heights 6 and 7: node-2 mines blocks of its own.
    for i in 6..=7 {
        f.mine_at(&[0, 2, 3], GENESIS + 12 * i).await;
        f.mine_at(&[1], GENESIS + 12 * i + 1).await;
    }
    let forked = Instant::now();
    let d = f
        .wait(
            "node-2's divergence",
            FindingKind::Divergence,
            "node-2",
            FindingState::Open,
        )
        .await;
    detected("node-2 alone on a side branch: divergence", forked);
    assert_eq!(d.verdict(), Verdict::Node, "{d:?}");
    // node-2 drops its branch and takes the others' blocks.
    let rejoined = Instant::now();
    f.mine_at(&[0, 2, 3], GENESIS + 12 * 8).await;
    f.revert(1, &before).await;
    f.copy_blocks(1, 0, 6..=8).await;
    let r = f
        .wait(
            "node-2's reorg",
            FindingKind::Reorg,
            "node-2",
            FindingState::Occurred,
        )
        .await;
    detected("node-2 rejoins: reorg with its verdict", rejoined);
    assert_eq!(r.verdict(), Verdict::Node, "{r:?}");
    assert!(
        r.verdict_reason.contains("node-2 alone held block"),
        "{}",
        r.verdict_reason
    );
    assert_eq!(r.fork_point, Some(5), "{r:?}");
    f.wait(
        "node-2's divergence to resolve",
        FindingKind::Divergence,
        "node-2",
        FindingState::Resolved,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let kinds: Vec<(String, String, String)> = f
        .alerts()
        .into_iter()
        .map(|(n, k, s, _)| (n, k, s))
        .collect();
    let want = |k: &str, s: &str| ("node-2".to_string(), k.to_string(), s.to_string());
    assert_eq!(
        kinds,
        vec![
            want("divergence", "open"),
            want("divergence", "resolved"),
            want("reorg", "occurred")
        ]
    );
}

#[tokio::test]
async fn the_whole_network_going_back_and_building_other_blocks_is_one_network_reorg() {
    let f = Four::start().await;
    for i in 1..=5 {
        f.mine_at(&[0, 1, 2, 3], GENESIS + 12 * i).await;
    }
    // Each agent sees every block it is later asked to compare.
    f.all_at_head().await;
    let mut snaps = Vec::new();
    for i in 0..4 {
        snaps.push(f.snapshot(i).await);
    }
    for i in 6..=9 {
        f.mine_at(&[0, 1, 2, 3], GENESIS + 12 * i).await;
    }
    f.all_at_head().await;
    // Every node drops 6..=9 and builds 6..=8 of another branch: the new
    // head is lower than the old one.
    let reorged = Instant::now();
    for (i, snap) in snaps.iter().enumerate() {
        f.revert(i, snap).await;
        for h in 6..=8 {
            f.mine_at(&[i], GENESIS + 12 * h + 5).await;
        }
    }
    let n = f
        .wait(
            "the network's reorg",
            FindingKind::Reorg,
            "",
            FindingState::Occurred,
        )
        .await;
    detected(
        "every node went back and built other blocks: network reorg",
        reorged,
    );
    assert_eq!(n.verdict(), Verdict::Network, "{n:?}");
    assert_eq!(n.fork_point, Some(5), "{n:?}");
    assert_eq!(n.nodes.len(), 4, "{n:?}");
    let logs = f.logs();
    let logs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
    let nodes = wait_for("every node's reorg", WAIT, &logs, || async {
        let r: Vec<_> = f
            .findings()
            .await
            .into_iter()
            .filter(|nf| {
                !nf.node_id.is_empty()
                    && nf.finding.as_ref().is_some_and(|x| {
                        // Judged, not only reported.
                        x.kind() == FindingKind::Reorg && x.verdict() != Verdict::Unspecified
                    })
            })
            .collect();
        (r.len() == 4).then_some(r)
    })
    .await;
    for nf in &nodes {
        let x = nf.finding.as_ref().unwrap();
        assert_eq!(x.verdict(), Verdict::Network, "{x:?}");
        assert_eq!(x.cause_id, n.id, "{x:?}");
    }
    // Regressions seen on the way are part of it, once judged.
    let regressions = wait_for("the regressions judged", WAIT, &logs, || async {
        let r: Vec<_> = f
            .findings()
            .await
            .into_iter()
            .filter_map(|nf| nf.finding)
            .filter(|x| x.kind() == FindingKind::HeightRegression)
            .collect();
        r.iter()
            .all(|x| x.verdict() != Verdict::Unspecified)
            .then_some(r)
    })
    .await;
    for x in regressions {
        assert_eq!(x.cause_id, n.id, "{x:?}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = f.alerts();
    assert_eq!(
        alerts,
        vec![(
            String::new(),
            "reorg".into(),
            "occurred".into(),
            n.id.clone()
        )],
        "one alert for one cause"
    );
    let body = &f.hook.bodies()[0];
    assert_eq!(body["version"], 1);
    assert_eq!(body["nodes"].as_array().map(Vec::len), Some(4));
    println!(
        "webhook body: {}",
        serde_json::to_string_pretty(body).unwrap()
    );
}

#[tokio::test]
async fn a_two_against_two_split_is_one_network_finding_and_one_alert() {
    let f = Four::start().await;
    for i in 1..=5 {
        f.mine_at(&[0, 1, 2, 3], GENESIS + 12 * i).await;
    }
    f.all_at_head().await;
    let snaps = [f.snapshot(2).await, f.snapshot(3).await];
    let split = Instant::now();
    for i in 6..=8 {
        f.mine_at(&[0, 1], GENESIS + 12 * i).await;
        f.mine_at(&[2, 3], GENESIS + 12 * i + 1).await;
    }
    let s = f
        .wait("the split", FindingKind::Divergence, "", FindingState::Open)
        .await;
    detected("two against two: network split", split);
    assert_eq!(s.verdict(), Verdict::Network, "{s:?}");
    assert_eq!(s.groups.len(), 2, "{s:?}");
    assert_eq!(s.fork_point, Some(5), "{s:?}");
    let fleet =
        f.q.clone()
            .fleet(FleetRequest::default())
            .await
            .unwrap()
            .into_inner();
    let statuses: Vec<&str> = fleet.networks[0]
        .nodes
        .iter()
        .map(|n| n.status.as_str())
        .collect();
    assert_eq!(statuses, vec!["diverged"; 4]);
    // node-3 and node-4 take the other side's blocks.
    let healed = Instant::now();
    for (k, i) in [2, 3].into_iter().enumerate() {
        f.revert(i, &snaps[k]).await;
        f.copy_blocks(i, 0, 6..=8).await;
    }
    let r = f
        .wait(
            "the split to resolve",
            FindingKind::Divergence,
            "",
            FindingState::Resolved,
        )
        .await;
    detected("two against two: split resolved", healed);
    assert_eq!(r.id, s.id);
    for node in ["node-3", "node-4"] {
        let x = f
            .wait(
                "the reorg that ended the split",
                FindingKind::Reorg,
                node,
                FindingState::Occurred,
            )
            .await;
        assert_eq!(x.cause_id, s.id, "{x:?}");
        assert_eq!(x.verdict(), Verdict::Network, "{x:?}");
    }
    // Time for a late alert to arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = f.alerts();
    assert_eq!(
        alerts,
        vec![
            (
                String::new(),
                "divergence".into(),
                "open".into(),
                s.id.clone()
            ),
            (
                String::new(),
                "divergence".into(),
                "resolved".into(),
                s.id.clone()
            ),
        ],
        "the split, alerted once and resolved once; the nodes' parts are not alerted"
    );
}

/// One anvil, mined every 500 ms, with its agent and an aggregator.
async fn solo(
    extra_tables: &'static str,
    url: Option<String>,
) -> (World, Anvil, Aggregator, Agent, QueryClient<Channel>) {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let url = url.unwrap_or_else(|| anvil.url());
    let opts = AgentOptions {
        extra_tables,
        ..Default::default()
    };
    let agent = Agent::start(&world, "node-1", &url, &agg, opts);
    let q = world.query(&agg).await;
    (world, anvil, agg, agent, q)
}

async fn wait_one(
    q: &QueryClient<Channel>,
    logs: &[&Path],
    what: &str,
    kind: FindingKind,
    state: FindingState,
    nth: usize,
) -> outpost::proto::Finding {
    wait_for(what, WAIT, logs, || async {
        let all = q
            .clone()
            .list_findings(ListFindingsRequest {
                kind: Some(kind as i32),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .findings;
        let mut of: Vec<_> = all
            .into_iter()
            .filter_map(|nf| nf.finding)
            .filter(|f| f.state() == state)
            .collect();
        of.sort_by_key(|f| f.opened_at_unix_ms);
        (of.len() > nth).then(|| of.swap_remove(nth))
    })
    .await
}

#[tokio::test]
async fn an_agent_that_was_stopped_says_so_and_does_not_blame_its_node() {
    let (_w, anvil, agg, mut agent, q) = solo("", None).await;
    let anvil = std::sync::Arc::new(anvil);
    let miner = Miner::start(anvil.clone(), Duration::from_millis(500));
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent.signal("STOP");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let thawed = Instant::now();
    agent.signal("CONT");
    let logs = [agent.log.as_path(), agg.log.as_path()];
    let p = wait_one(
        &q,
        &logs,
        "agent-paused",
        FindingKind::AgentPaused,
        FindingState::Occurred,
        0,
    )
    .await;
    detected("agent stopped for 10 s: agent-paused", thawed);
    assert_eq!(p.verdict(), Verdict::MonitoringPath, "{p:?}");
    assert!(p.summary.contains("did not run for 1"), "{}", p.summary);
    // Its node went on mining; the agent catches up and blames nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    miner.stop().await;
    let all = q
        .clone()
        .list_findings(ListFindingsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .findings;
    let stalls: Vec<_> = all
        .iter()
        .filter_map(|nf| nf.finding.as_ref())
        .filter(|f| f.kind() == FindingKind::Stall)
        .collect();
    assert!(stalls.is_empty(), "{stalls:#?}");
    assert!(agent.running());
}

#[tokio::test]
async fn an_unreachable_node_is_blamed_on_what_the_agent_can_tell() {
    // The host probe finds the node by a pid file written once anvil runs.
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let pid_file = world.path().join("anvil.pid");
    std::fs::write(&pid_file, anvil.pid().unwrap().to_string()).unwrap();
    let agg = Aggregator::start(&world).await;
    let tables: &'static str = Box::leak(
        format!(
            "[host]\ninterval = \"200ms\"\nnode_pid_file = \"{}\"\n",
            pid_file.display()
        )
        .into_boxed_str(),
    );
    let opts = AgentOptions {
        extra_tables: tables,
        block_time: "60s",
        ..Default::default()
    };
    let agent = Agent::start(&world, "node-1", &anvil.url(), &agg, opts);
    let q = world.query(&agg).await;
    anvil.mine(3).await;
    let mut qq = q.clone();
    wait_at_head(&mut qq, &anvil, &agent, &agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];

    // The process runs but its RPC does not answer.
    let stopped = Instant::now();
    anvil.signal("STOP");
    let f = wait_one(
        &q,
        &logs,
        "unreachable",
        FindingKind::Unreachable,
        FindingState::Open,
        0,
    )
    .await;
    detected("node process stopped (SIGSTOP): unreachable", stopped);
    assert_eq!(f.verdict(), Verdict::Node, "{f:?}");
    assert!(
        f.verdict_reason.contains("does not answer in time"),
        "{}",
        f.verdict_reason
    );
    anvil.signal("CONT");
    wait_one(
        &q,
        &logs,
        "unreachable to resolve",
        FindingKind::Unreachable,
        FindingState::Resolved,
        0,
    )
    .await;

    // The process is gone: nothing listens.
    let mut anvil = anvil;
    let killed = Instant::now();
    anvil.kill();
    let f = wait_one(
        &q,
        &logs,
        "a second unreachable",
        FindingKind::Unreachable,
        FindingState::Open,
        0,
    )
    .await;
    detected("node process killed: unreachable", killed);
    assert_eq!(f.verdict(), Verdict::Node, "{f:?}");
    assert!(
        f.verdict_reason.contains("not running")
            || f.verdict_reason.contains("nothing accepts connections"),
        "{}",
        f.verdict_reason
    );
    drop(agent);

    // An RPC that refuses the agent's credentials.
    let denied = http_fixture(|_| async { (401, b"{\"error\":\"unauthorized\"}".to_vec()) }).await;
    let (_w, _anvil, agg, agent, q) = solo("", Some(denied)).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    let f = wait_one(
        &q,
        &logs,
        "unreachable (401)",
        FindingKind::Unreachable,
        FindingState::Open,
        0,
    )
    .await;
    assert_eq!(f.verdict(), Verdict::MonitoringPath, "{f:?}");
    assert!(
        f.verdict_reason.contains("HTTP 401"),
        "{}",
        f.verdict_reason
    );
}
