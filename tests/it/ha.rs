//! An HA pair: agents report every event to two aggregators, each stream
//! with its own resume point and acknowledgements, and both aggregators
//! alert through one Alertmanager cluster, which notifies once.

use std::sync::Arc;
use std::time::Duration;

use outpost::proto::{
    query_client::QueryClient, FindingKind, FindingState, GetNodeRequest, ListFindingsRequest,
};
use outpost::store::local::LocalStore;
use outpost::store::Durability;
use serde_json::json;
use tonic::transport::Channel;

use crate::delivery::{assert_complete, event_log};
use crate::harness::{
    wait_for, Agent, AgentOptions, Aggregator, Alertmanager, Anvil, Miner, Recorder, World,
};
use crate::spine::wait_at_head;

#[tokio::test]
async fn an_agent_delivers_everything_to_both_of_a_pair_and_one_down_holds_back_neither() {
    let world = World::new();
    let anvil = Arc::new(Anvil::start(&world, "anvil").await);
    let a = Aggregator::start_named(&world, "agg-a", "127.0.0.1", "").await;
    let mut b = Aggregator::start_named(&world, "agg-b", "127.0.0.1", "").await;
    let mut agent = Agent::start(
        &world,
        "node-1",
        &anvil.url(),
        &a,
        AgentOptions {
            poll_interval: "50ms",
            block_time: "60s",
            also_report_to: vec![b.port],
            ..Default::default()
        },
    );
    // A second agent on the same node reports to a only.
    let _only_a = Agent::start(
        &world,
        "node-2",
        &anvil.url(),
        &a,
        AgentOptions {
            block_time: "60s",
            ..Default::default()
        },
    );
    let mut qa = world.query(&a).await;
    let mut qb = world.query(&b).await;
    anvil.mine(5).await;
    wait_at_head(&mut qa, &anvil, &agent, &a).await;
    wait_at_head(&mut qb, &anvil, &agent, &b).await;

    // b is killed while blocks keep coming: a keeps up.
    b.kill9();
    let miner = Miner::start(anvil.clone(), Duration::from_millis(60));
    tokio::time::sleep(Duration::from_secs(2)).await;
    miner.stop().await;
    wait_at_head(&mut qa, &anvil, &agent, &a).await;
    // The agent's status, at a, shows b's backlog.
    let b_url = format!("https://127.0.0.1:{}", b.port);
    let logs = [agent.log.as_path(), a.log.as_path()];
    let waiting = wait_for(
        "a status that shows b's backlog",
        Duration::from_secs(10),
        &logs,
        || {
            let mut q = qa.clone();
            let b_url = b_url.clone();
            async move {
                let d = q
                    .get_node(GetNodeRequest {
                        node_id: "node-1".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let ds = d.status?.deliveries;
                let b = ds.iter().find(|d| d.aggregator == b_url)?.clone();
                (ds.len() == 2 && !b.connected && b.backlog > 20).then_some(ds)
            }
        },
    )
    .await;
    let to_a = waiting.iter().find(|d| d.aggregator != b_url).unwrap();
    assert!(to_a.connected && to_a.backlog < 5, "{waiting:?}");
    // Asked of both, the view is a's, with a warning for b.
    let (ok, out, err) = query_both(&world, &a, &b, &["nodes", "--json"]);
    assert!(ok, "{err}");
    assert!(err.contains("warning:") && err.contains(&b_url), "{err}");
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{out}");

    // b comes back and catches up from its own resume point.
    b.restart(&world).await;
    let mut qb = world.query(&b).await;
    wait_at_head(&mut qb, &anvil, &agent, &b).await;
    // Both answer: node-1 from either, node-2 marked as not at b.
    let (ok, out, err) = query_both(&world, &a, &b, &["nodes", "--json"]);
    assert!(ok && !err.contains("warning:"), "{err}");
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    let missing: Vec<(String, serde_json::Value)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_string(),
                n["missing_at"].clone(),
            )
        })
        .collect();
    assert_eq!(
        missing,
        [
            ("node-1".to_string(), json!([])),
            ("node-2".to_string(), json!([b_url]))
        ]
    );
    let (ok, text, _) = query_both(&world, &a, &b, &["nodes"]);
    assert!(ok && text.contains(&format!("not at {b_url}")), "{text}");
    assert!(agent.terminate().unwrap().success());

    // Each holds every event once, every block once, with the same seqs.
    let n = assert_complete(&mut qa, "node-1", &anvil).await;
    assert_eq!(assert_complete(&mut qb, "node-1", &anvil).await, n);
    let (la, lb) = (
        event_log(&mut qa, "node-1").await,
        event_log(&mut qb, "node-1").await,
    );
    assert_eq!(la, lb, "both aggregators hold the same events");
    // And the agent's outbox is empty: both acknowledged everything.
    let store =
        LocalStore::open(&agent.data_dir, 1 << 20, Durability::ProcessCrash, u64::MAX).unwrap();
    assert_eq!(store.records_after(0, 10).unwrap().len(), 0);
}

/// `outpost query ARGS` with both aggregators as `--endpoint`: whether it
/// succeeded, its stdout and its stderr.
fn query_both(
    world: &World,
    a: &Aggregator,
    b: &Aggregator,
    args: &[&str],
) -> (bool, String, String) {
    let pki = world.pki();
    let out = std::process::Command::new(crate::harness::outpost_bin())
        .arg("query")
        .args(args)
        .arg("--endpoint")
        .arg(format!(
            "https://127.0.0.1:{},https://127.0.0.1:{}",
            a.port, b.port
        ))
        .args(["--server-name", "localhost", "--ca"])
        .arg(pki.ca_cert())
        .arg("--cert")
        .arg(pki.cert("operator-tester"))
        .arg("--key")
        .arg(pki.key("operator-tester"))
        .output()
        .expect("outpost runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GENESIS: u64 = 1_700_000_000;
const WAIT: Duration = Duration::from_secs(40);

/// Three clustered Alertmanagers with a recording webhook behind them.
async fn alertmanager_cluster(dir: &std::path::Path, hook: &str) -> Vec<Alertmanager> {
    let config = format!(
        "route:\n  receiver: hook\n  group_by: ['finding_id']\n  group_wait: 1s\n  group_interval: 10s\n  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n      - url: '{hook}/am'\n        send_resolved: true\n"
    );
    let mut ams: Vec<Alertmanager> = Vec::new();
    for i in 0..3 {
        let peers: Vec<u16> = ams.iter().map(|a| a.cluster_port).collect();
        ams.push(Alertmanager::start(
            &dir.join(format!("am-{i}")),
            &config,
            &peers,
        ));
    }
    let logs: Vec<std::path::PathBuf> = ams.iter().map(|a| a.log.clone()).collect();
    let logs: Vec<&std::path::Path> = logs.iter().map(|p| p.as_path()).collect();
    for am in &ams {
        wait_for("a settled cluster of three", WAIT, &logs, || async {
            (am.settled_peers().await? == 3).then_some(())
        })
        .await;
    }
    ams
}

/// The notifications the webhook got for finding `id`, by status, in order.
fn notified(hook: &Recorder, id: &str) -> Vec<String> {
    hook.bodies()
        .iter()
        .filter(|b| {
            b["alerts"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["labels"]["finding_id"] == id))
        })
        .map(|b| b["status"].as_str().unwrap_or("").to_string())
        .collect()
}

async fn open_finding(
    at: &str,
    q: &QueryClient<Channel>,
    kind: FindingKind,
    node: &str,
    state: FindingState,
    logs: &[&std::path::Path],
) -> outpost::proto::Finding {
    let find = || async {
        q.clone()
            .list_findings(ListFindingsRequest {
                kind: Some(kind as i32),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .findings
            .into_iter()
            .find(|nf| {
                nf.node_id == node && nf.finding.as_ref().is_some_and(|f| f.state() == state)
            })
            .and_then(|nf| nf.finding)
    };
    let end = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < end {
        if let Some(f) = find().await {
            return f;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the aggregator holds, beside its log, to tell why.
    let view = q
        .clone()
        .fleet(outpost::proto::FleetRequest::default())
        .await
        .map(|r| format!("{:?}", r.into_inner()));
    wait_for(
        &format!(
            "{} {} on {node} at {at}; its fleet view: {view:?}",
            kind.as_str_name(),
            state.as_str_name()
        ),
        Duration::ZERO,
        logs,
        find,
    )
    .await
}

/// Both members of a pair post every alert to every member of an
/// Alertmanager cluster; one aggregator and one Alertmanager are killed in
/// the middle. Each notification reaches the receiver once.
#[tokio::test]
async fn a_pair_behind_an_alertmanager_cluster_notifies_each_change_once() {
    let world = World::new();
    let (hook, hook_url) = Recorder::start().await;
    let mut ams = alertmanager_cluster(&world.path().join("alertmanagers"), &hook_url).await;
    let sinks: String = ams
        .iter()
        .map(|am| {
            format!(
                "[[alert]]\nkind = \"alertmanager\"\nurl = \"{}\"\nresend = \"1s\"\n",
                am.url
            )
        })
        .collect();
    let extra = format!("[fleet]\nsilent_after = \"5s\"\n{sinks}");
    let a = Aggregator::start_named(&world, "agg-a", "127.0.0.1", &extra).await;
    let mut b = Aggregator::start_named(&world, "agg-b", "127.0.0.1", &extra).await;
    let mut anvils = Vec::new();
    for i in 1..=3 {
        anvils.push(Anvil::start(&world, &format!("anvil-{i}")).await);
    }
    let agents: Vec<Agent> = anvils
        .iter()
        .enumerate()
        .map(|(i, anvil)| {
            Agent::start(
                &world,
                &format!("node-{}", i + 1),
                &anvil.url(),
                &a,
                AgentOptions {
                    block_time: "60s",
                    also_report_to: vec![b.port],
                    ..Default::default()
                },
            )
        })
        .collect();
    let qa = world.query(&a).await;
    let qb = world.query(&b).await;
    let mine = |nodes: &'static [usize], ts: u64| {
        let anvils = &anvils;
        async move {
            for &i in nodes {
                anvils[i].rpc("evm_mine", json!([ts])).await;
            }
        }
    };
    for i in 1..=5 {
        mine(&[0, 1, 2], GENESIS + 12 * i).await;
    }
    for (anvil, agent) in anvils.iter().zip(&agents) {
        wait_at_head(&mut qa.clone(), anvil, agent, &a).await;
        wait_at_head(&mut qb.clone(), anvil, agent, &b).await;
    }
    let mut logs: Vec<std::path::PathBuf> = agents.iter().map(|a| a.log.clone()).collect();
    logs.extend([a.log.clone(), b.log.clone()]);
    logs.extend(ams.iter().map(|am| am.log.clone()));
    let logs: Vec<&std::path::Path> = logs.iter().map(|p| p.as_path()).collect();

    // node-2 mines two blocks of its own: both aggregators see it diverge.
    let before = anvils[1].rpc("evm_snapshot", json!([])).await;
    for i in 6..=7 {
        mine(&[0, 2], GENESIS + 12 * i).await;
        mine(&[1], GENESIS + 12 * i + 1).await;
    }
    let div = open_finding(
        "agg-a",
        &qa,
        FindingKind::Divergence,
        "node-2",
        FindingState::Open,
        &logs,
    )
    .await;
    let at_b = open_finding(
        "agg-b",
        &qb,
        FindingKind::Divergence,
        "node-2",
        FindingState::Open,
        &logs,
    )
    .await;
    assert_eq!(div.id, at_b.id, "both members name the finding alike");
    wait_for("the divergence notified", WAIT, &logs, || async {
        (!notified(&hook, &div.id).is_empty()).then_some(())
    })
    .await;

    // One aggregator and one Alertmanager die, after the cluster's gossip
    // (every 100 ms) has carried the notification: a member killed before
    // it tells the others notifies again through them, as Alertmanager's
    // at-least-once delivery allows.
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.kill9();
    ams[1].kill9();

    // node-2 rejoins: the divergence resolves. node-3 falls behind: a lag.
    mine(&[0, 2], GENESIS + 12 * 8).await;
    assert_eq!(
        anvils[1].rpc("evm_revert", json!([before])).await,
        json!(true)
    );
    anvils[1].copy_blocks(&anvils[0], 6..=8).await;
    open_finding(
        "agg-a",
        &qa,
        FindingKind::Divergence,
        "node-2",
        FindingState::Resolved,
        &logs,
    )
    .await;
    for i in 9..=16 {
        mine(&[0, 1], GENESIS + 12 * i).await;
    }
    let lag = open_finding(
        "agg-a",
        &qa,
        FindingKind::Lag,
        "node-3",
        FindingState::Open,
        &logs,
    )
    .await;

    // The dead aggregator returns, catches up and judges alike.
    b.restart(&world).await;
    let qb = world.query(&b).await;
    let lag_b = open_finding(
        "agg-b",
        &qb,
        FindingKind::Lag,
        "node-3",
        FindingState::Open,
        &logs,
    )
    .await;
    assert_eq!(lag.id, lag_b.id);
    open_finding(
        "agg-b",
        &qb,
        FindingKind::Divergence,
        "node-2",
        FindingState::Resolved,
        &logs,
    )
    .await;

    // node-3 catches up: the lag resolves at both.
    anvils[2].copy_blocks(&anvils[0], 9..=16).await;
    open_finding(
        "agg-a",
        &qa,
        FindingKind::Lag,
        "node-3",
        FindingState::Resolved,
        &logs,
    )
    .await;
    open_finding(
        "agg-b",
        &qb,
        FindingKind::Lag,
        "node-3",
        FindingState::Resolved,
        &logs,
    )
    .await;
    wait_for("the lag's resolve notified", WAIT, &logs, || async {
        notified(&hook, &lag.id)
            .contains(&"resolved".to_string())
            .then_some(())
    })
    .await;
    // Resends go on for a while: nothing more may be notified.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for id in [&div.id, &lag.id] {
        assert_eq!(
            notified(&hook, id),
            ["firing", "resolved"],
            "{id}: {:#?}",
            received(&hook)
        );
    }
}

/// Each notification the webhook got: its status and, per alert, the
/// finding id, status, start and end.
fn received(hook: &Recorder) -> Vec<(String, Vec<String>)> {
    hook.bodies()
        .iter()
        .map(|b| {
            let alerts = b["alerts"].as_array().cloned().unwrap_or_default();
            let alerts = alerts
                .iter()
                .map(|x| {
                    format!(
                        "{} {} {} {}",
                        x["labels"]["finding_id"], x["status"], x["startsAt"], x["endsAt"]
                    )
                })
                .collect();
            (b["status"].as_str().unwrap_or("").to_string(), alerts)
        })
        .collect()
}
