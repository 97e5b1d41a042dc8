//! RPC timings and health: per-method latency in the status report, and the
//! slow-RPC and RPC-error findings, with a proxy in front of anvil that
//! delays or fails replies.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use outpost::proto::{FindingKind, FindingState, GetNodeRequest};

use crate::harness::{
    faulty_proxy, wait_for, Agent, AgentOptions, Aggregator, Anvil, Faults, World,
};
use crate::spine::{wait_at_head, wait_finding};

#[tokio::test]
async fn slow_and_failing_rpc_open_findings_that_resolve_when_the_node_recovers() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let faults = Arc::new(Faults::default());
    let proxy = faulty_proxy(anvil.url(), |_, _| {}, faults.clone()).await;
    let agent = Agent::start(
        &world,
        "node-1",
        &proxy,
        &agg,
        AgentOptions {
            block_time: "1h",
            extra_validate: "slow_rpc_p99 = \"150ms\"\nrpc_error_window = \"4s\"",
            ..Default::default()
        },
    );
    let mut q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    anvil.mine(3).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;

    // Each method's latency, validation time per header and the stream's
    // round trip arrive with the status.
    let status = wait_for(
        "timings in the status",
        Duration::from_secs(20),
        &logs,
        || {
            let mut c = q.clone();
            async move {
                let s = c
                    .get_node(GetNodeRequest {
                        node_id: "node-1".into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .status?;
                (s.rpc_methods.len() >= 2 && s.round_trip.is_some_and(|r| r.count > 0)).then_some(s)
            }
        },
    )
    .await;
    let methods: Vec<&str> = status
        .rpc_methods
        .iter()
        .map(|m| m.method.as_str())
        .collect();
    assert!(
        methods.contains(&"eth_blockNumber") && methods.contains(&"eth_getBlockByNumber"),
        "{methods:?}"
    );
    assert_eq!(status.rpc_errors, 0);

    faults.delay_ms.store(250, SeqCst);
    let slow = wait_finding(
        &q,
        "node-1",
        FindingKind::SlowRpc,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        slow.summary.contains("threshold 150 ms"),
        "{}",
        slow.summary
    );
    faults.delay_ms.store(0, SeqCst);
    let fast = wait_finding(
        &q,
        "node-1",
        FindingKind::SlowRpc,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(fast.id, slow.id);

    // One request in four fails: never three polls in a row, so the node
    // stays reachable, but a quarter of the calls fail.
    faults.fail_every.store(4, SeqCst);
    let failing = wait_finding(
        &q,
        "node-1",
        FindingKind::RpcErrors,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        failing.summary.contains("threshold 5.0 %"),
        "{}",
        failing.summary
    );
    faults.fail_every.store(0, SeqCst);
    let healed = wait_finding(
        &q,
        "node-1",
        FindingKind::RpcErrors,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(healed.id, failing.id);
}
