//! Fleet truth across several real anvil nodes: divergence, lag, a network
//! stall, a silent agent, alert sinks and Prometheus.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost::proto::{
    query_client::QueryClient, Finding, FindingKind, FindingState, ListFindingsRequest, Verdict,
};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::harness::{
    hex, wait_for, Agent, AgentOptions, Aggregator, Alertmanager, Anvil, Prometheus, Recorder,
    World,
};
use crate::spine::wait_at_head;

const WAIT: Duration = Duration::from_secs(40);
const GENESIS: u64 = 1_700_000_000;

/// Anvils from one genesis, each with its agent, and one aggregator.
pub struct Fleet {
    pub world: World,
    pub anvils: Vec<Anvil>,
    pub agents: Vec<Agent>,
    pub agg: Aggregator,
    pub q: QueryClient<Channel>,
}

impl Fleet {
    /// Three nodes.
    async fn start(aggregator_extra: &str, opts: fn() -> AgentOptions) -> Fleet {
        Fleet::of(3, aggregator_extra, opts).await
    }

    /// `n` nodes, `node-1`..`node-n` on `anvil-1`..`anvil-n`.
    pub async fn of(n: usize, aggregator_extra: &str, opts: fn() -> AgentOptions) -> Fleet {
        let world = World::new();
        let mut anvils = Vec::new();
        for i in 1..=n {
            anvils.push(Anvil::start(&world, &format!("anvil-{i}")).await);
        }
        let agg = Aggregator::start_with(&world, aggregator_extra).await;
        let agents = anvils
            .iter()
            .enumerate()
            .map(|(i, a)| Agent::start(&world, &format!("node-{}", i + 1), &a.url(), &agg, opts()))
            .collect();
        let q = world.query(&agg).await;
        Fleet {
            world,
            anvils,
            agents,
            agg,
            q,
        }
    }

    pub fn logs(&self) -> Vec<PathBuf> {
        let mut l: Vec<PathBuf> = self.agents.iter().map(|a| a.log.clone()).collect();
        l.push(self.agg.log.clone());
        l
    }

    /// Mines one block stamped `ts` on the given nodes (0-based). Blocks of
    /// one parent and one timestamp are the same block on every anvil.
    pub async fn mine_at(&self, nodes: &[usize], ts: u64) {
        for &i in nodes {
            self.anvils[i].rpc("evm_mine", json!([ts])).await;
        }
    }

    async fn findings(&self, kind: FindingKind) -> Vec<(String, Finding)> {
        self.q
            .clone()
            .list_findings(ListFindingsRequest {
                kind: Some(kind as i32),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .findings
            .into_iter()
            .filter_map(|nf| nf.finding.map(|f| (nf.node_id, f)))
            .collect()
    }

    async fn wait_finding(
        &self,
        what: &str,
        kind: FindingKind,
        node: &str,
        state: FindingState,
    ) -> Finding {
        let logs = self.logs();
        let logs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
        wait_for(what, WAIT, &logs, || async {
            self.findings(kind)
                .await
                .into_iter()
                .find(|(n, f)| n == node && f.state() == state)
                .map(|(_, f)| f)
        })
        .await
    }

    pub async fn all_at_head(&self) {
        for (anvil, agent) in self.anvils.iter().zip(&self.agents) {
            let mut q = self.q.clone();
            wait_at_head(&mut q, anvil, agent, &self.agg).await;
        }
    }
}

pub fn fast() -> AgentOptions {
    AgentOptions {
        block_time: "60s",
        ..Default::default()
    }
}

#[tokio::test]
async fn a_minority_fork_names_the_node_the_fork_point_and_resolves_when_it_rejoins() {
    let mut fleet = Fleet::start("[fleet]\nsilent_after = \"30s\"\nlag_blocks = 50\n", fast).await;
    let shared: Vec<u64> = (1..=5).map(|i| GENESIS + 12 * i).collect();
    for &ts in &shared {
        fleet.mine_at(&[0, 1, 2], ts).await;
    }
    fleet.all_at_head().await;
    assert!(
        fleet.findings(FindingKind::Divergence).await.is_empty(),
        "identical chains agree"
    );

    // Heights 6..=8: node-3 mines blocks of its own.
    for i in 6..=8 {
        fleet.mine_at(&[0, 1], GENESIS + 12 * i).await;
        fleet.mine_at(&[2], GENESIS + 12 * i + 1).await;
    }
    assert_ne!(fleet.anvils[0].hash(6).await, fleet.anvils[2].hash(6).await);
    let f = fleet
        .wait_finding(
            "a divergence finding for node-3",
            FindingKind::Divergence,
            "node-3",
            FindingState::Open,
        )
        .await;
    assert_eq!(f.verdict(), Verdict::Node, "{f:?}");
    assert_eq!(f.fork_point, Some(5), "{f:?}");
    assert_eq!(f.depth, Some(3), "{f:?}");
    let canonical = f
        .groups
        .iter()
        .find(|g| g.canonical)
        .expect("a canonical group");
    assert_eq!(canonical.node_ids, vec!["node-1", "node-2"]);
    assert_eq!(hex(&canonical.hash), fleet.anvils[0].hash(8).await);
    let minority = f
        .groups
        .iter()
        .find(|g| !g.canonical)
        .expect("a minority group");
    assert_eq!(minority.node_ids, vec!["node-3"]);
    let all = fleet.findings(FindingKind::Divergence).await;
    assert_eq!(all.len(), 1, "only the minority node diverges: {all:?}");

    // Bring node-3 back: a fresh anvil with the same genesis, replaying the
    // majority's blocks, ends with the majority's hashes.
    fleet.anvils[2].kill();
    fleet.anvils[2].restart().await;
    for i in 1..=8 {
        fleet.mine_at(&[2], GENESIS + 12 * i).await;
    }
    assert_eq!(fleet.anvils[2].hash(8).await, fleet.anvils[0].hash(8).await);
    let r = fleet
        .wait_finding(
            "the divergence to resolve",
            FindingKind::Divergence,
            "node-3",
            FindingState::Resolved,
        )
        .await;
    assert_eq!(r.id, f.id);
}

#[tokio::test]
async fn a_node_that_falls_behind_lags_and_recovers() {
    let fleet = Fleet::start("[fleet]\nsilent_after = \"30s\"\nlag_blocks = 5\n", fast).await;
    for i in 1..=12 {
        fleet.mine_at(&[0, 1], GENESIS + 12 * i).await;
    }
    for i in 1..=2 {
        fleet.mine_at(&[2], GENESIS + 12 * i).await;
    }
    let f = fleet
        .wait_finding(
            "a lag finding for node-3",
            FindingKind::Lag,
            "node-3",
            FindingState::Open,
        )
        .await;
    assert_eq!(f.verdict(), Verdict::Node, "{f:?}");
    // The clock may judge while blocks are still arriving: at least 6 behind.
    assert!(
        f.summary.contains("blocks behind the fleet head"),
        "{}",
        f.summary
    );
    assert!(f.height <= 2, "node-3 is at most at height 2: {f:?}");
    for (n, _) in fleet.findings(FindingKind::Lag).await {
        assert_eq!(n, "node-3", "only node-3 lags");
    }
    for i in 3..=12 {
        fleet.mine_at(&[2], GENESIS + 12 * i).await;
    }
    let r = fleet
        .wait_finding(
            "the lag to resolve",
            FindingKind::Lag,
            "node-3",
            FindingState::Resolved,
        )
        .await;
    assert_eq!(r.id, f.id);
    assert!(
        fleet.findings(FindingKind::Divergence).await.is_empty(),
        "a lagging node is not a fork"
    );
}

fn stalls_quickly() -> AgentOptions {
    AgentOptions {
        block_time: "500ms",
        stall_multiple: 4.0,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_network_stall_is_one_network_alert_and_reaches_every_sink_once() {
    let (hook, hook_url) = Recorder::start().await;
    let (slack, slack_url) = Recorder::start().await;
    let am_dir = tempfile::tempdir().unwrap();
    let am = Alertmanager::start(
        am_dir.path(),
        "route:\n  receiver: none\nreceivers:\n  - name: none\n",
        &[],
    );
    let logs = [am.log.clone()];
    let logs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
    wait_for("alertmanager to answer", WAIT, &logs, || am.alerts()).await;
    let extra = format!(
        "[fleet]\nsilent_after = \"30s\"\n[[alert]]\nkind = \"webhook\"\nurl = \"{hook_url}/hook\"\n[[alert]]\nkind = \"slack\"\nurl = \"{slack_url}/slack\"\n[[alert]]\nkind = \"alertmanager\"\nurl = \"{}\"\n",
        am.url
    );
    let fleet = Fleet::start(&extra, stalls_quickly).await;
    // Mine together for a while, then stop everywhere.
    for i in 1..=10 {
        fleet.mine_at(&[0, 1, 2], GENESIS + 12 * i).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let f = fleet
        .wait_finding(
            "a network stall",
            FindingKind::NetworkStall,
            "",
            FindingState::Open,
        )
        .await;
    assert_eq!(f.verdict(), Verdict::Network, "{f:?}");
    assert_eq!(f.network, "devnet");

    // Alertmanager accepted the v2 payload (it validates against its schema).
    let logs2 = fleet.logs();
    let logs2: Vec<&Path> = logs2.iter().map(PathBuf::as_path).collect();
    let alert = wait_for("the alert in alertmanager", WAIT, &logs2, || async {
        am.alerts()
            .await?
            .into_iter()
            .find(|a| a["labels"]["kind"] == "network-stall")
    })
    .await;
    assert_eq!(alert["labels"]["verdict"], "network");
    assert_eq!(alert["labels"]["network"], "devnet");
    assert_eq!(alert["status"]["state"], "active");

    // Mining resumes: the stall resolves.
    for i in 11..=13 {
        fleet.mine_at(&[0, 1, 2], GENESIS + 12 * i).await;
    }
    let r = fleet
        .wait_finding(
            "the network stall to resolve",
            FindingKind::NetworkStall,
            "",
            FindingState::Resolved,
        )
        .await;
    assert_eq!(r.id, f.id);
    wait_for(
        "alertmanager to drop the resolved alert",
        WAIT,
        &logs2,
        || async {
            let alerts = am.alerts().await?;
            (!alerts
                .iter()
                .any(|a| a["labels"]["kind"] == "network-stall"))
            .then_some(())
        },
    )
    .await;
    // Give late duplicates a chance to arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let hooks = hook.bodies();
    let ours: Vec<&Value> = hooks.iter().filter(|v| v["id"] == json!(f.id)).collect();
    let states: Vec<&str> = ours.iter().map(|v| v["state"].as_str().unwrap()).collect();
    assert_eq!(
        states,
        vec!["open", "resolved"],
        "one alert, one resolve: {hooks:#?}"
    );
    assert_eq!(ours[0]["verdict"], "network");
    assert!(
        !hooks.iter().any(|v| v["kind"] == "stall"),
        "per-node stalls are not alerted during a network stall: {hooks:#?}"
    );
    let texts: Vec<String> = slack
        .bodies()
        .iter()
        .filter_map(|v| v["text"].as_str().map(String::from))
        .collect();
    // Mining stopped again after the resume, so a second stall may follow;
    // count the first one's messages.
    let first = |t: &&String| t.contains("network-stall") && t.contains("at height 10");
    let firing = texts
        .iter()
        .filter(first)
        .filter(|t| t.contains("[FIRING]"))
        .count();
    let resolved = texts
        .iter()
        .filter(first)
        .filter(|t| t.contains("[RESOLVED]"))
        .count();
    assert_eq!((firing, resolved), (1, 1), "{texts:#?}");
    assert!(
        !texts.iter().any(|t| t.contains(" stall on ")),
        "{texts:#?}"
    );
}

#[tokio::test]
async fn a_killed_agent_is_silent_and_blamed_on_the_monitoring_path() {
    let mut fleet = Fleet::start("[fleet]\nsilent_after = \"3s\"\n", fast).await;
    for i in 1..=3 {
        fleet.mine_at(&[0, 1, 2], GENESIS + 12 * i).await;
    }
    fleet.all_at_head().await;
    fleet.agents[1].kill9();
    // Its node keeps running and mining.
    fleet.mine_at(&[0, 1, 2], GENESIS + 48).await;
    let f = fleet
        .wait_finding(
            "an agent-silent finding",
            FindingKind::AgentSilent,
            "node-2",
            FindingState::Open,
        )
        .await;
    assert_eq!(f.verdict(), Verdict::MonitoringPath, "{f:?}");
    assert!(f.verdict_reason.contains("healthy"), "{}", f.verdict_reason);
    for (n, _) in fleet.findings(FindingKind::AgentSilent).await {
        assert_eq!(n, "node-2");
    }
    fleet.agents[1].restart();
    fleet
        .wait_finding(
            "the silence to end",
            FindingKind::AgentSilent,
            "node-2",
            FindingState::Resolved,
        )
        .await;
}

/// Debian's prometheus scrapes the aggregator's /metrics; PromQL sees a head.
#[tokio::test]
async fn prometheus_scrapes_node_heads() {
    let fleet = Fleet::start("", fast).await;
    for i in 1..=7 {
        fleet.mine_at(&[0, 1, 2], GENESIS + 12 * i).await;
    }
    let prom = Prometheus::start(
        &fleet.world.path().join("prometheus"),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: outpost\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            fleet.agg.metrics_port
        ),
    );
    let logs = [prom.log.as_path(), fleet.agg.log.as_path()];
    let value = wait_for(
        "PromQL to return node-1's head of 7",
        WAIT,
        &logs,
        || async {
            let s = prom
                .value("outpost_node_head_height{node=\"node-1\"}")
                .await?;
            (s == "7").then_some(s)
        },
    )
    .await;
    assert_eq!(value, "7");
}

/// SIGHUP applies a new silence window and a new alert sink without a
/// restart, names a change that needs one, and refuses a broken config.
#[tokio::test]
async fn aggregator_reload_applies_fleet_thresholds_and_sinks_live() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start_with(&world, "[fleet]\nsilent_after = \"300s\"\n").await;
    let mut agent = Agent::start(&world, "node-1", &anvil.url(), &agg, fast());
    let mut q = world.query(&agg).await;
    anvil.mine(2).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    let agent_log = agent.log.clone();
    let logs = [agg.log.as_path(), agent_log.as_path()];

    // A broken config is refused; the aggregator keeps serving.
    let good = std::fs::read_to_string(&agg.config).unwrap();
    std::fs::write(
        &agg.config,
        good.replace("silent_after = \"300s\"", "silent_after = \"soon\""),
    )
    .unwrap();
    agg.signal("HUP");
    wait_for("the reload to be refused", WAIT, &logs, || async {
        let log = std::fs::read_to_string(&agg.log).ok()?;
        log.contains("config reload refused, the running config stays in force")
            .then_some(())
    })
    .await;
    assert!(
        crate::spine::node(&mut q, "node-1").await.is_some(),
        "the aggregator stopped serving after a refused reload"
    );

    let (hook, hook_url) = Recorder::start().await;
    let reloaded = good
        .replace("silent_after = \"300s\"", "silent_after = \"2s\"")
        .replace("cache_bytes = 16777216", "cache_bytes = 33554432")
        + &format!("[[alert]]\nkind = \"webhook\"\nurl = \"{hook_url}/hook\"\n");
    std::fs::write(&agg.config, reloaded).unwrap();
    agg.signal("HUP");
    wait_for("the reload to apply", WAIT, &logs, || async {
        let log = std::fs::read_to_string(&agg.log).ok()?;
        (log.contains("config reloaded: fleet.silent_after: \"5m\" -> \"2s\"")
            && log.contains("config change needs a restart to apply: store.cache_bytes"))
        .then_some(())
    })
    .await;

    // With the old 300 s window this would take five minutes.
    agent.kill9();
    let body = wait_for(
        "the agent-silent alert at the new sink",
        WAIT,
        &logs,
        || async {
            hook.bodies()
                .into_iter()
                .find(|b| b["kind"] == "agent-silent" && b["node_id"] == "node-1")
        },
    )
    .await;
    assert_eq!(body["verdict"], "monitoring-path", "{body}");
}

#[tokio::test]
async fn one_aggregator_keeps_three_chains_as_three_networks() {
    use std::sync::atomic::Ordering::SeqCst;

    use crate::bitcoin::{cookie_source, FixtureNode, COOKIE};
    use crate::cometbft::FixtureChain;

    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let anvil = Anvil::start(&world, "anvil").await;
    anvil.mine(7).await;
    let btc = Arc::new(FixtureNode::load());
    btc.tip.store(120, SeqCst);
    let btc_url = crate::bitcoin::serve(btc.clone()).await;
    let cosmos = FixtureChain::at(40);
    let cosmos_url = crate::cometbft::serve(cosmos.clone()).await;
    let agents = [
        Agent::start(&world, "eth-1", &anvil.url(), &agg, AgentOptions::default()),
        Agent::start(
            &world,
            "btc-1",
            &btc_url,
            &agg,
            AgentOptions {
                kind: "bitcoin",
                network: "bitcoin-main",
                extra_source: cookie_source(&world, COOKIE, "main"),
                ..Default::default()
            },
        ),
        Agent::start(
            &world,
            "cosmos-1",
            &cosmos_url,
            &agg,
            AgentOptions {
                kind: "cometbft",
                network: "cosmoshub-4",
                ..Default::default()
            },
        ),
    ];
    let q = world.query(&agg).await;
    let logs: Vec<&std::path::Path> = agents
        .iter()
        .map(|a| a.log.as_path())
        .chain([agg.log.as_path()])
        .collect();
    let want = [
        ("bitcoin-main", "bitcoin", "btc-1", 120),
        ("cosmoshub-4", "cometbft", "cosmos-1", 40),
        ("devnet", "ethereum", "eth-1", 7),
    ];
    let networks = wait_for("three networks at their heads", WAIT, &logs, || {
        let mut c = q.clone();
        async move {
            let mut nets = c
                .fleet(outpost::proto::FleetRequest::default())
                .await
                .ok()?
                .into_inner()
                .networks;
            nets.sort_by(|a, b| a.network.cmp(&b.network));
            let ok = nets.len() == 3
                && nets.iter().zip(want).all(|(n, (net, chain, node, head))| {
                    n.network == net
                        && n.chain == chain
                        && n.fleet_head == head
                        && n.nodes.len() == 1
                        && n.nodes[0].node_id == node
                        && n.nodes[0].agrees
                });
            ok.then_some(nets)
        }
    })
    .await;
    // Each network's consensus is its own: the Bitcoin node's hash is
    // mainnet's block 120, in display order.
    assert_eq!(
        hex(&networks[0].nodes[0].hash),
        format!("0x{}", btc.hash_hex(120))
    );
}
