//! The Prometheus source against a real scrape target: Debian's
//! `prometheus-node-exporter` serving a textfile-collector file that the
//! test rewrites, so the test controls the "node's" height, peers, mempool
//! and sync state while the exporter does the exposition.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost::proto::{FindingKind, FindingState, GetNodeRequest};

use crate::harness::{free_port, wait_for, Agent, AgentOptions, Aggregator, World};
use crate::spine::{node, wait_finding};

const EXPORTER: &str = "/usr/bin/prometheus-node-exporter";

struct Exporter {
    child: Child,
    dir: PathBuf,
    url: String,
}

/// What the exporter's textfile says about the node.
struct Drachma {
    height: u64,
    peers: u64,
    syncing: bool,
}

impl Exporter {
    async fn start(world: &World) -> Exporter {
        assert!(
            Path::new(EXPORTER).exists(),
            "{EXPORTER} is missing: install Debian's prometheus-node-exporter (tests/run.sh does)"
        );
        let dir = world.path().join("textfile");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log = std::fs::File::create(world.path().join("node-exporter.log")).unwrap();
        let child = Command::new(EXPORTER)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!("--collector.textfile.directory={}", dir.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus-node-exporter");
        let url = format!("http://127.0.0.1:{port}/metrics");
        let probe = reqwest::Client::new();
        wait_for(
            "node exporter to serve /metrics",
            Duration::from_secs(20),
            &[&world.path().join("node-exporter.log")],
            || {
                let req = probe.get(&url).send();
                async move { req.await.ok().filter(|r| r.status().is_success()) }
            },
        )
        .await;
        Exporter { child, dir, url }
    }

    /// Replaces the textfile in one rename, as the collector's docs ask.
    fn set(&self, d: &Drachma) {
        let text = format!(
            "# HELP drachma_blocks Height of the best block.\n\
             # TYPE drachma_blocks gauge\n\
             drachma_blocks {}\n\
             # TYPE drachma_peers_count gauge\n\
             drachma_peers_count{{direction=\"in\"}} 2\n\
             drachma_peers_count{{direction=\"out\"}} {}\n\
             # TYPE drachma_mempool_transactions gauge\n\
             drachma_mempool_transactions 17\n\
             # TYPE drachma_initial_block_download gauge\n\
             drachma_initial_block_download {}\n\
             # TYPE drachma_chain_info gauge\n\
             drachma_chain_info{{network=\"drachma-main\",version=\"0.21.1\"}} 1\n",
            d.height,
            d.peers,
            u8::from(d.syncing)
        );
        let tmp = self.dir.join("drachma.prom.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("drachma.prom")).unwrap();
    }

    fn clear(&self) {
        std::fs::remove_file(self.dir.join("drachma.prom")).unwrap();
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const METRICS: &str = r#"
[source.metrics]
height = "drachma_blocks"
peers = 'drachma_peers_count{direction="out"}'
mempool = "drachma_mempool_transactions"
syncing = "drachma_initial_block_download"
network = "drachma_chain_info{network}"
"#;

fn source(network_id: &str) -> &'static str {
    Box::leak(format!("network_id = \"{network_id}\"\n{METRICS}").into_boxed_str())
}

#[tokio::test]
async fn scraped_heights_grow_stall_sync_vanish_and_die() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let exporter = Exporter::start(&world).await;
    let mut d = Drachma {
        height: 100,
        peers: 8,
        syncing: false,
    };
    exporter.set(&d);
    let agent = Agent::start(
        &world,
        "drachma-1",
        &exporter.url,
        &agg,
        AgentOptions {
            kind: "prometheus",
            network: "drachma",
            extra_source: source("drachma-main"),
            block_time: "1s",
            ..Default::default()
        },
    );
    let q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    let at = |height: u64| {
        let q = q.clone();
        move || {
            let mut c = q.clone();
            async move {
                let h = node(&mut c, "drachma-1").await?.head?;
                (h.height == height).then_some(h)
            }
        }
    };
    let head = wait_for("drachma-1 at 100", Duration::from_secs(30), &logs, at(100)).await;
    assert!(head.hash.is_empty(), "a scrape has no hashes");

    for h in 101..=110 {
        d.height = h;
        exporter.set(&d);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_for("drachma-1 at 110", Duration::from_secs(30), &logs, at(110)).await;
    let status = wait_for("peers and mempool", Duration::from_secs(30), &logs, || {
        let mut c = q.clone();
        async move {
            let s = c
                .get_node(GetNodeRequest {
                    node_id: "drachma-1".into(),
                })
                .await
                .ok()?
                .into_inner()
                .status?;
            (s.peers == Some(8)).then_some(s)
        }
    })
    .await;
    assert_eq!(status.mempool_size, Some(17));

    d.syncing = true;
    exporter.set(&d);
    wait_finding(
        &q,
        "drachma-1",
        FindingKind::Syncing,
        FindingState::Open,
        &logs,
    )
    .await;
    d.syncing = false;
    exporter.set(&d);
    wait_finding(
        &q,
        "drachma-1",
        FindingKind::Syncing,
        FindingState::Resolved,
        &logs,
    )
    .await;

    // The height stays put past three block times: a stall.
    let stall = wait_finding(
        &q,
        "drachma-1",
        FindingKind::Stall,
        FindingState::Open,
        &logs,
    )
    .await;
    assert_eq!(stall.height, 110, "{stall:?}");
    d.height = 111;
    exporter.set(&d);
    wait_finding(
        &q,
        "drachma-1",
        FindingKind::Stall,
        FindingState::Resolved,
        &logs,
    )
    .await;

    // The series disappears from the scrape: the node counts as unreachable,
    // and the finding says which metric is missing.
    exporter.clear();
    let down = wait_finding(
        &q,
        "drachma-1",
        FindingKind::Unreachable,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(down.summary.contains("drachma_blocks"), "{}", down.summary);
    d.height = 112;
    exporter.set(&d);
    wait_finding(
        &q,
        "drachma-1",
        FindingKind::Unreachable,
        FindingState::Resolved,
        &logs,
    )
    .await;
    wait_for("drachma-1 at 112", Duration::from_secs(30), &logs, at(112)).await;

    // The exporter dies: the node is unreachable, with the cause.
    let mut exporter = exporter;
    exporter.child.kill().unwrap();
    exporter.child.wait().unwrap();
    let gone = wait_finding(
        &q,
        "drachma-1",
        FindingKind::Unreachable,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        gone.summary.contains("refused the connection"),
        "{}",
        gone.summary
    );
}

#[tokio::test]
async fn a_scrape_from_another_network_is_refused() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let exporter = Exporter::start(&world).await;
    exporter.set(&Drachma {
        height: 5,
        peers: 1,
        syncing: false,
    });
    let mut agent = Agent::start(
        &world,
        "drachma-t",
        &exporter.url,
        &agg,
        AgentOptions {
            kind: "prometheus",
            network: "drachma",
            extra_source: source("drachma-test"),
            ..Default::default()
        },
    );
    let log_path = agent.log.clone();
    let status = wait_for(
        "the agent to exit",
        Duration::from_secs(30),
        &[log_path.as_path()],
        || {
            let s = agent.exited();
            async move { s }
        },
    )
    .await;
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("is on network drachma-main, but the config expects drachma-test"),
        "{log}"
    );
}
