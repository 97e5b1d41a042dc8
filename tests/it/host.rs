//! The host probe on this machine: a threshold low enough to cross opens a
//! finding, and raising it by a live reload resolves the finding.

use std::time::Duration;

use outpost::proto::{FindingKind, FindingState, GetNodeRequest};

use crate::harness::{wait_for, AgentOptions, Solo};
use crate::spine::wait_finding;

#[tokio::test]
async fn a_crossed_memory_threshold_opens_a_finding_that_a_raised_threshold_resolves() {
    let Solo {
        world: _world,
        anvil: _anvil,
        agg,
        agent,
        q,
    } = Solo::start(AgentOptions {
        extra_tables: "[host]\ninterval = \"200ms\"\nsustain = \"1s\"\nmemory_percent = 0.5\n",
        ..Default::default()
    })
    .await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    let opened = wait_finding(
        &q,
        "node-1",
        FindingKind::HostMemory,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        opened.summary.contains("memory use")
            && opened.summary.contains("above 0.5 % for at least 1s"),
        "{}",
        opened.summary
    );

    // The sample travels in the node's status: the host's memory, and the
    // agent's own resident memory as the kernel counts it.
    let host = wait_for(
        "a host sample at the aggregator",
        Duration::from_secs(20),
        &logs,
        || {
            let mut c = q.clone();
            async move {
                c.get_node(GetNodeRequest {
                    node_id: "node-1".into(),
                })
                .await
                .ok()?
                .into_inner()
                .status?
                .host
            }
        },
    )
    .await;
    assert!(
        host.memory_percent > 0.5 && host.memory_percent <= 100.0,
        "{host:?}"
    );
    assert!(host.outpost_rss_bytes > 1 << 20, "{host:?}");
    assert!(
        host.disk_percent > 0.0 && host.disk_path.ends_with("node-1-data"),
        "{host:?}"
    );

    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace("memory_percent = 0.5", "memory_percent = 100.0"),
    )
    .unwrap();
    agent.signal("HUP");
    let resolved = wait_finding(
        &q,
        "node-1",
        FindingKind::HostMemory,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(
        resolved.id, opened.id,
        "one finding, opened once and resolved once"
    );
}
