//! Shards in one global view: two aggregators, each serving its own network
//! with an agent on its own anvil, scraped by a real Prometheus that
//! remote-writes into a real VictoriaMetrics (Debian's packages). One
//! PromQL query against VictoriaMetrics returns each shard's node head,
//! the series told apart by the aggregators' `metrics.labels`.

use std::time::Duration;

use crate::harness::{
    daemon, free_port, get_json, wait_for, Agent, AgentOptions, Aggregator, Anvil, Prometheus,
    World,
};
use crate::spine::wait_at_head;

/// One shard: its own PKI, anvil, aggregator (labelled `aggregator=name`)
/// and one agent reporting under `network`.
struct Shard {
    _world: World,
    anvil: Anvil,
    agg: Aggregator,
    _agent: Agent,
}

async fn shard(name: &str, network: &'static str, blocks: u64) -> Shard {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    // Appended under the harness's [metrics] table.
    let agg =
        Aggregator::start_with(&world, &format!("labels = {{ aggregator = \"{name}\" }}\n")).await;
    let opts = AgentOptions {
        network,
        block_time: "60s",
        ..Default::default()
    };
    let agent = Agent::start(&world, &format!("node-{network}"), &anvil.url(), &agg, opts);
    anvil.mine(blocks).await;
    let mut q = world.query(&agg).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    Shard {
        _world: world,
        anvil,
        agg,
        _agent: agent,
    }
}

#[tokio::test]
async fn prometheus_and_victoria_metrics_merge_two_shards_into_one_view() {
    let eu = shard("agg-eu", "eu", 3).await;
    let us = shard("agg-us", "us", 5).await;
    let dir = tempfile::tempdir().unwrap();
    let vm_port = free_port();
    let vm_log = dir.path().join("victoria-metrics.log");
    let _vm = daemon(
        "/usr/bin/victoria-metrics",
        &[
            format!("-httpListenAddr=127.0.0.1:{vm_port}"),
            format!("-storageDataPath={}", dir.path().join("vm").display()),
            // Data is queryable as soon as it is written.
            "-search.latencyOffset=0s".into(),
            "-search.disableCache".into(),
        ],
        &vm_log,
    );
    let prom = Prometheus::start(
        &dir.path().join("prom"),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: outpost\n    static_configs:\n      - targets: ['127.0.0.1:{}', '127.0.0.1:{}']\nremote_write:\n  - url: http://127.0.0.1:{vm_port}/api/v1/write\n    queue_config:\n      batch_send_deadline: 1s\n",
            eu.agg.metrics_port, us.agg.metrics_port
        ),
    );
    let logs = [
        vm_log.as_path(),
        prom.log.as_path(),
        eu.agg.log.as_path(),
        us.agg.log.as_path(),
    ];
    let url = format!("http://127.0.0.1:{vm_port}/api/v1/query");
    let query = |q: &'static str| {
        let url = url.clone();
        async move {
            let v = get_json(&url, &[("query", q)]).await?;
            v["data"]["result"].as_array().cloned()
        }
    };
    let (eu_head, us_head) = (eu.anvil.head().await, us.anvil.head().await);
    let heads = wait_for(
        "VictoriaMetrics to hold both shards' heads",
        Duration::from_secs(60),
        &logs,
        || async {
            let r = query("outpost_node_head_height").await?;
            let mut got: Vec<(String, String, String, u64)> = r
                .iter()
                .map(|s| {
                    let l = |k: &str| s["metric"][k].as_str().unwrap_or_default().to_string();
                    let v = s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    (l("aggregator"), l("network"), l("node"), v)
                })
                .collect();
            got.sort();
            (got.len() == 2 && got.iter().all(|g| g.3 > 0)).then_some(got)
        },
    )
    .await;
    assert_eq!(
        heads,
        vec![
            ("agg-eu".into(), "eu".into(), "node-eu".into(), eu_head),
            ("agg-us".into(), "us".into(), "node-us".into(), us_head),
        ]
    );
    // A series with no labels of its own stays one per aggregator.
    let connected = wait_for(
        "agents connected per aggregator",
        Duration::from_secs(30),
        &logs,
        || async {
            let r = query("sum by (aggregator) (outpost_agents_connected)").await?;
            let mut got: Vec<(String, String)> = r
                .iter()
                .map(|s| {
                    (
                        s["metric"]["aggregator"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        s["value"][1].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            got.sort();
            (got.len() == 2).then_some(got)
        },
    )
    .await;
    assert_eq!(
        connected,
        vec![("agg-eu".into(), "1".into()), ("agg-us".into(), "1".into())]
    );
}
