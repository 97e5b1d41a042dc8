//! The Prometheus rule pack (`packaging/prometheus/outpost-rules.yml`):
//! promtool checks it and runs its unit tests, and a real Prometheus that
//! scrapes a real aggregator loads it and fires an alert when an agent goes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{wait_for, Agent, AgentOptions, Aggregator, Anvil, Prometheus, World};
use crate::spine::wait_at_head;

const PROMTOOL: &str = "/usr/bin/promtool";

fn pack(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/prometheus")
        .join(file)
}

fn promtool(args: &[&str]) -> String {
    assert!(
        Path::new(PROMTOOL).exists(),
        "{PROMTOOL} not found: install Debian's prometheus (tests/run.sh does)"
    );
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(pack(""))
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_rule_pack_passes_promtool_check_and_its_unit_tests() {
    let checked = promtool(&["check", "rules", "outpost-rules.yml"]);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "outpost-rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The alerts Prometheus holds, as (alert name, node, state).
async fn alerts(prom: &Prometheus) -> Option<Vec<(String, String, String)>> {
    let v = prom.api("/api/v1/alerts", &[]).await?;
    let text = |a: &Value, k: &str| a[k].as_str().unwrap_or_default().to_string();
    Some(
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .map(|a| {
                (
                    text(&a["labels"], "alertname"),
                    text(&a["labels"], "node"),
                    text(a, "state"),
                )
            })
            .collect(),
    )
}

#[tokio::test]
async fn prometheus_with_the_rule_pack_fires_when_an_agent_disconnects() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let opts = AgentOptions {
        block_time: "60s",
        extra_tables: "[store]\noutbox_quota_bytes = 1048576\n",
        ..Default::default()
    };
    let mut agent = Agent::start(&world, "node-1", &anvil.url(), &agg, opts);
    anvil.mine(3).await;
    let mut q = world.query(&agg).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;

    // The pack as shipped, with every `for:` at 0s so that the test does not
    // wait minutes for an alert to go from pending to firing.
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(pack("outpost-rules.yml")).unwrap();
    let rules: String = shipped
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 0s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(rules.matches("for: 0s").count(), 6, "{rules}");
    let rules_path = dir.path().join("outpost-rules.yml");
    std::fs::write(&rules_path, rules).unwrap();
    let prom = Prometheus::start(
        &dir.path().join("prometheus"),
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{}']\nscrape_configs:\n  - job_name: outpost\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            rules_path.display(),
            agg.metrics_port
        ),
    );
    let logs = [prom.log.as_path(), agg.log.as_path()];

    // Connected, with the outbox quota its config sets: the agent's status
    // reached the metrics Prometheus reads.
    wait_for(
        "Prometheus to see node-1 connected with its outbox quota",
        Duration::from_secs(60),
        &logs,
        || async {
            let connected = prom
                .value("outpost_node_connected{node=\"node-1\"}")
                .await?;
            let quota = prom
                .value("outpost_node_outbox_quota_bytes{node=\"node-1\"}")
                .await?;
            (connected == "1" && quota == "1048576").then_some(())
        },
    )
    .await;
    // The rules are loaded and evaluated, and none fires for a healthy node.
    let before = wait_for(
        "Prometheus to evaluate the rule pack",
        Duration::from_secs(30),
        &logs,
        || async {
            let v = prom.api("/api/v1/rules", &[]).await?;
            let rules = v["data"]["groups"][0]["rules"].as_array()?;
            let evaluated = rules.len() == 6
                && rules
                    .iter()
                    .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z");
            if evaluated {
                alerts(&prom).await
            } else {
                None
            }
        },
    )
    .await;
    assert!(
        !before.iter().any(|a| a.0 == "OutpostAgentDisconnected"),
        "{before:?}"
    );

    agent.kill9();
    let firing = wait_for(
        "OutpostAgentDisconnected to fire for node-1",
        Duration::from_secs(60),
        &logs,
        || async {
            let all = alerts(&prom).await?;
            all.iter()
                .any(|a| a.0 == "OutpostAgentDisconnected" && a.1 == "node-1" && a.2 == "firing")
                .then_some(all)
        },
    )
    .await;
    assert_eq!(
        firing
            .iter()
            .filter(|a| a.0 == "OutpostAgentDisconnected")
            .count(),
        1,
        "{firing:?}"
    );
}
