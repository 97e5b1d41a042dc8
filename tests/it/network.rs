//! Real network cuts: the agent and its node in a network namespace of
//! their own, joined to the aggregator by a veth pair that the test takes
//! down and brings back (not a process kill).

use std::process::Command;
use std::time::{Duration, Instant};

use outpost::proto::{FindingKind, FindingState, Verdict};

use crate::delivery::{assert_complete_upto, rounds};
use crate::harness::{Agent, AgentOptions, Aggregator, Anvil, World};
use crate::spine::{findings, node, wait_at_head, wait_finding};

/// A network namespace joined to this one by a veth pair, removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs: tests/run.sh installs it");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id();
        let name = format!("outpost-it-{id}");
        let (host_if, ns_if) = (
            format!("oph{}", id % 100_000),
            format!("opn{}", id % 100_000),
        );
        let net = format!("10.213.{}", id % 250);
        let (host_ip, ns_ip) = (format!("{net}.1"), format!("{net}.2"));
        ip(&["netns", "add", &name]);
        let n = Netns {
            name,
            host_if,
            host_ip,
            ns_ip,
        };
        ip(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &n.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", n.host_ip),
            "dev",
            &n.host_if,
        ]);
        ip(&["link", "set", &n.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &n.name, "ip"];
            all.extend(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{}/30", n.ns_ip), "dev", &ns_if]);
        inside(&["link", "set", &ns_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        n
    }

    fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// How many times the aggregator logged that `node` connected.
fn connects(agg: &Aggregator, node: &str) -> usize {
    std::fs::read_to_string(&agg.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("agent connected") && l.contains(node))
        .count()
}

#[tokio::test]
async fn a_network_cut_is_the_monitoring_path_and_the_backlog_arrives_after_it() {
    let net = Netns::new();
    let world = World::new();
    // The node mines a block a second on its own, through the cut.
    let anvil = Anvil::start_in(&world, "anvil", &net.name, &net.ns_ip, "1").await;
    let agg = Aggregator::start_on(&world, "0.0.0.0", "[fleet]\nsilent_after = \"5s\"\n").await;
    let ns: &'static str = Box::leak(net.name.clone().into_boxed_str());
    let agg_host: &'static str = Box::leak(net.host_ip.clone().into_boxed_str());
    // The agent polls its node on the namespace's own loopback.
    let agent = Agent::start(
        &world,
        "node-1",
        &format!("http://127.0.0.1:{}", anvil.port),
        &agg,
        AgentOptions {
            block_time: "60s",
            aggregator_host: agg_host,
            netns: ns,
            ..Default::default()
        },
    );
    let mut q = world.query(&agg).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    let cut_for = Duration::from_secs(rounds("OUTPOST_SOAK_CUT_SECS", 30) as u64);
    let mut reconnects = Vec::new();
    for round in 0..rounds("OUTPOST_SOAK_NETWORK_CUTS", 2) {
        let before = connects(&agg, "node-1");
        let opened = findings(&mut q, "node-1", FindingKind::AgentSilent)
            .await
            .len();
        net.cut();
        let cut_at = Instant::now();
        let silent = crate::harness::wait_for(
            "agent-silent during the cut",
            Duration::from_secs(20),
            &logs,
            || {
                let mut c = q.clone();
                async move {
                    let all = findings(&mut c, "node-1", FindingKind::AgentSilent).await;
                    (all.len() > opened)
                        .then(|| all.into_iter().find(|f| f.state() == FindingState::Open))
                        .flatten()
                }
            },
        )
        .await;
        assert_eq!(
            silent.verdict(),
            Verdict::MonitoringPath,
            "round {round}: {silent:?}"
        );
        tokio::time::sleep(cut_for.saturating_sub(cut_at.elapsed())).await;
        net.heal();
        let healed = Instant::now();
        crate::harness::wait_for(
            "a reconnect after the heal",
            Duration::from_secs(60),
            &logs,
            || async { (connects(&agg, "node-1") > before).then_some(()) },
        )
        .await;
        reconnects.push(healed.elapsed());
        wait_finding(
            &q,
            "node-1",
            FindingKind::AgentSilent,
            FindingState::Resolved,
            &logs,
        )
        .await;
        // What the node made during the cut arrives, block for block.
        let head = wait_at_head(&mut q, &anvil, &agent, &agg).await;
        assert_complete_upto(&mut q, "node-1", &anvil, head).await;
    }
    let n = node(&mut q, "node-1").await.expect("node-1");
    assert!(n.connected);
    eprintln!("reconnect after heal: {reconnects:?}");
    for r in &reconnects {
        assert!(
            *r < Duration::from_secs(2),
            "reconnect took {r:?} after the heal: {reconnects:?}"
        );
    }
}
