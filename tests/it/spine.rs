//! One agent beside a real anvil node: headers, reorgs, stalls, an
//! unreachable node, as the aggregator reports them.

use std::time::Duration;

use outpost::proto::{
    query_client::QueryClient, Finding, FindingKind, FindingState, Header, HeadersRequest,
    ListFindingsRequest, ListNodesRequest, NodeSummary, Severity,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::harness::{hex, Agent, AgentOptions, Aggregator, Anvil, Solo, World};

pub const WAIT: Duration = Duration::from_secs(30);

pub async fn node(client: &mut QueryClient<Channel>, id: &str) -> Option<NodeSummary> {
    let nodes = client
        .list_nodes(ListNodesRequest {})
        .await
        .ok()?
        .into_inner()
        .nodes;
    nodes.into_iter().find(|n| n.node_id == id)
}

pub async fn findings(
    client: &mut QueryClient<Channel>,
    id: &str,
    kind: FindingKind,
) -> Vec<Finding> {
    client
        .list_findings(ListFindingsRequest {
            node_id: id.into(),
            kind: Some(kind as i32),
            ..Default::default()
        })
        .await
        .map(|r| {
            r.into_inner()
                .findings
                .into_iter()
                .filter_map(|f| f.finding)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `node` has a finding of `kind` in `state`, and returns it.
pub async fn wait_finding(
    q: &QueryClient<Channel>,
    node: &str,
    kind: FindingKind,
    state: FindingState,
    logs: &[&std::path::Path],
) -> Finding {
    let what = format!(
        "{node}: a {} finding that is {}",
        kind.label(),
        state.label()
    );
    crate::harness::wait_for(&what, WAIT, logs, || {
        let mut c = q.clone();
        async move {
            findings(&mut c, node, kind)
                .await
                .into_iter()
                .find(|f| f.state() == state)
        }
    })
    .await
}

/// Waits for the critical reorg a final chain's rewritten committed blocks
/// give, and checks where it forked, how deep, and that it names finality.
pub async fn wait_final_reorg(
    q: &QueryClient<Channel>,
    node: &str,
    logs: &[&std::path::Path],
    fork_point: u64,
    depth: u64,
) {
    let f = wait_finding(q, node, FindingKind::Reorg, FindingState::Occurred, logs).await;
    assert_eq!(f.severity(), Severity::Critical, "{node}: {f:?}");
    assert_eq!((f.fork_point, f.depth), (Some(fork_point), Some(depth)));
    assert!(f.summary.contains("finality forbids"), "{}", f.summary);
}

/// Takes the node away (`down` on: its fixture closes every connection),
/// waits for `unreachable` with the cause, brings it back and waits for
/// the finding to resolve.
pub async fn goes_away_and_returns(
    q: &QueryClient<Channel>,
    node: &str,
    down: &std::sync::atomic::AtomicBool,
    logs: &[&std::path::Path],
) {
    use std::sync::atomic::Ordering::SeqCst;
    down.store(true, SeqCst);
    let gone = wait_finding(q, node, FindingKind::Unreachable, FindingState::Open, logs).await;
    assert!(
        gone.summary.contains("node unreachable"),
        "{}",
        gone.summary
    );
    down.store(false, SeqCst);
    wait_finding(
        q,
        node,
        FindingKind::Unreachable,
        FindingState::Resolved,
        logs,
    )
    .await;
}

/// The headers the aggregator holds for `id` from `from` to `to`, after
/// checking that each one is the block anvil has at its height.
pub async fn stored_as_anvil(
    client: &mut QueryClient<Channel>,
    anvil: &Anvil,
    id: &str,
    from: u64,
    to: u64,
) -> Vec<Header> {
    let headers = client
        .headers(HeadersRequest {
            node_id: id.into(),
            from_height: from,
            to_height: to,
        })
        .await
        .unwrap()
        .into_inner()
        .headers;
    for h in &headers {
        assert_eq!(
            hex(&h.hash),
            anvil.hash(h.height).await,
            "{id}: hash at height {}",
            h.height
        );
    }
    headers
}

/// Waits until the aggregator shows `id` at anvil's current head.
pub async fn wait_at_head(
    client: &mut QueryClient<Channel>,
    anvil: &Anvil,
    agent: &Agent,
    agg: &Aggregator,
) -> u64 {
    let head = anvil.head().await;
    let hash = anvil.hash(head).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    crate::harness::wait_for(
        &format!("{} at head {head}", agent.node_id),
        WAIT,
        &logs,
        || {
            let mut c = client.clone();
            let hash = hash.clone();
            let id = agent.node_id.clone();
            async move {
                let n = node(&mut c, &id).await?;
                let h = n.head?;
                (h.height == head && hex(&h.hash) == hash).then_some(())
            }
        },
    )
    .await;
    head
}

#[tokio::test]
async fn headers_match_anvil_block_for_block_and_reorg_is_reported_with_depth_and_fork_point() {
    let Solo {
        world: _world,
        anvil,
        agg,
        agent,
        mut q,
    } = Solo::start(AgentOptions::default()).await;

    // The agent starts at anvil's head (block 0), then sees 50 new blocks.
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    anvil.mine(50).await;
    let head = wait_at_head(&mut q, &anvil, &agent, &agg).await;
    assert_eq!(head, 50);
    let headers = stored_as_anvil(&mut q, &anvil, "node-1", 0, 50).await;
    assert_eq!(headers.len(), 51);

    let before: Vec<String> = [47, 48, 49, 50]
        .iter()
        .map(|&h| hex(&headers[h].hash))
        .collect();
    anvil.rpc("anvil_reorg", json!([3, []])).await;
    assert_eq!(anvil.head().await, 50, "anvil_reorg keeps the height");
    assert_ne!(anvil.hash(50).await, before[3]);
    let logs = [agent.log.as_path(), agg.log.as_path()];
    crate::harness::wait_for("a reorg finding", WAIT, &logs, || {
        let mut c = q.clone();
        async move {
            (!findings(&mut c, "node-1", FindingKind::Reorg)
                .await
                .is_empty())
            .then_some(())
        }
    })
    .await;
    // Later polls must not report the same reorg again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reorgs = findings(&mut q, "node-1", FindingKind::Reorg).await;
    assert_eq!(reorgs.len(), 1, "exactly one reorg finding: {reorgs:?}");
    let r = &reorgs[0];
    assert_eq!(r.depth, Some(3), "{r:?}");
    assert_eq!(r.fork_point, Some(47), "{r:?}");
    assert_eq!(r.state(), FindingState::Occurred);

    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    let after = stored_as_anvil(&mut q, &anvil, "node-1", 47, 50).await;
    assert_eq!(after.len(), 4);
    assert_eq!(hex(&after[0].hash), before[0], "the fork point is kept");
    for h in &after[1..] {
        assert_ne!(hex(&h.hash), before[(h.height - 47) as usize]);
    }
}

#[tokio::test]
async fn stall_opens_when_mining_stops_and_resolves_when_it_resumes() {
    let Solo {
        world: _world,
        anvil,
        agg,
        agent,
        mut q,
    } = Solo::start(AgentOptions {
        block_time: "500ms",
        stall_multiple: 4.0,
        ..Default::default()
    })
    .await;
    let logs = [agent.log.as_path(), agg.log.as_path()];

    // Mine steadily: no stall while blocks come every 200 ms.
    for _ in 0..10 {
        anvil.mine(1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    assert!(
        findings(&mut q, "node-1", FindingKind::Stall)
            .await
            .is_empty(),
        "no stall while mining"
    );

    // Stop mining: after 4 × 500 ms a stall opens, once.
    let open = wait_finding(&q, "node-1", FindingKind::Stall, FindingState::Open, &logs).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = findings(&mut q, "node-1", FindingKind::Stall).await;
    assert_eq!(all.len(), 1, "one stall, not one per poll: {all:?}");
    assert_eq!(
        q.get_node(outpost::proto::GetNodeRequest {
            node_id: "node-1".into()
        })
        .await
        .unwrap()
        .into_inner()
        .summary
        .unwrap()
        .status,
        "stalled"
    );

    anvil.mine(1).await;
    let resolved = wait_finding(
        &q,
        "node-1",
        FindingKind::Stall,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(resolved.id, open.id, "the same finding resolves");
    assert!(resolved.resolved_at_unix_ms >= resolved.opened_at_unix_ms);
}

#[tokio::test]
async fn killed_node_is_unreachable_and_the_agent_stays_up_until_it_returns() {
    // A long block time keeps stalls out of this test.
    let Solo {
        world: _world,
        mut anvil,
        agg,
        mut agent,
        mut q,
    } = Solo::start(AgentOptions {
        block_time: "60s",
        ..Default::default()
    })
    .await;
    anvil.mine(5).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    let (agent_log, agg_log) = (agent.log.clone(), agg.log.clone());
    let logs = [agent_log.as_path(), agg_log.as_path()];

    anvil.kill();
    let open = wait_finding(
        &q,
        "node-1",
        FindingKind::Unreachable,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(open.summary.contains("unreachable"), "{}", open.summary);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.running(), "the agent survives its node going away");
    assert_eq!(
        findings(&mut q, "node-1", FindingKind::Unreachable)
            .await
            .len(),
        1
    );

    anvil.restart().await;
    anvil.mine(5).await;
    let resolved = wait_finding(
        &q,
        "node-1",
        FindingKind::Unreachable,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(resolved.id, open.id);
    // The restarted anvil is the same genesis and the same five empty blocks.
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    assert!(agent.running());
}

/// systemd's notify protocol, spoken to a real datagram socket: READY=1 at
/// start, WATCHDOG=1 while the actors answer, STOPPING=1 on SIGTERM, and a
/// clean exit that closes the stream.
#[tokio::test]
async fn notifies_systemd_and_stops_cleanly_on_sigterm() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let sock_path = world.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut agent = Agent::start_with_env(
        &world,
        "node-1",
        &anvil.url(),
        &agg,
        AgentOptions::default(),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut received = String::new();
    let mut buf = [0u8; 4096];
    while !(received.contains("READY=1") && received.contains("WATCHDOG=1")) {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}); got {received:?}"));
        received.push_str(&String::from_utf8_lossy(&buf[..n]));
        received.push('\n');
    }
    let mut q = world.query(&agg).await;
    anvil.mine(3).await;
    wait_at_head(&mut q, &anvil, &agent, &agg).await;

    // `systemctl reload` sends SIGHUP: the agent must survive it.
    agent.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agent.running(), "SIGHUP must not end the agent");
    let status = agent.terminate().expect("agent was running");
    assert!(
        status.success(),
        "SIGTERM ends the agent with exit 0, got {status:?}"
    );
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("stream closed for shutdown"), "{log}");
    assert!(log.contains("agent stopped cleanly"), "{log}");
    let logs = [agg.log.as_path()];
    crate::harness::wait_for(
        "the aggregator to see a clean disconnect",
        WAIT,
        &logs,
        || async {
            std::fs::read_to_string(&agg.log)
                .ok()?
                .contains("agent disconnected")
                .then_some(())
        },
    )
    .await;
}

/// SIGHUP re-reads the agent config: validation thresholds apply at once,
/// a change that needs a restart is named, and a broken config is refused
/// with the running one kept.
#[tokio::test]
async fn agent_reload_applies_thresholds_live_and_refuses_a_broken_config() {
    let mut solo = Solo::start(AgentOptions {
        block_time: "60s",
        ..Default::default()
    })
    .await;
    solo.anvil.mine(2).await;
    wait_at_head(&mut solo.q, &solo.anvil, &solo.agent, &solo.agg).await;
    let (agent_log, agg_log) = (solo.agent.log.clone(), solo.agg.log.clone());
    let logs = [agent_log.as_path(), agg_log.as_path()];
    let log_has = |needle: &'static str| {
        let path = agent_log.clone();
        move || {
            let path = path.clone();
            async move {
                std::fs::read_to_string(&path)
                    .ok()?
                    .contains(needle)
                    .then_some(())
            }
        }
    };

    let good = std::fs::read_to_string(&solo.agent.config).unwrap();
    std::fs::write(
        &solo.agent.config,
        good.replace("poll_interval = \"100ms\"", "poll_interval = \"0s\""),
    )
    .unwrap();
    solo.agent.signal("HUP");
    crate::harness::wait_for(
        "the broken config to be refused",
        WAIT,
        &logs,
        log_has("config reload refused, the running config stays in force"),
    )
    .await;
    assert!(solo.agent.running(), "a refused reload ended the agent");
    let log = std::fs::read_to_string(&solo.agent.log).unwrap();
    assert!(
        log.contains("source.poll_interval: must be greater than zero"),
        "{log}"
    );

    // No block for 60 s is no stall yet; with a 1 s block time it is.
    std::fs::write(
        &solo.agent.config,
        good.replace(
            "expected_block_time = \"60s\"",
            "expected_block_time = \"1s\"",
        )
        .replace("network = \"devnet\"", "network = \"devnet-2\""),
    )
    .unwrap();
    solo.agent.signal("HUP");
    crate::harness::wait_for(
        "the reload to apply",
        WAIT,
        &logs,
        // Logged last, after every live change.
        log_has("config change needs a restart to apply: network: \"devnet\" -> \"devnet-2\""),
    )
    .await;
    let log = std::fs::read_to_string(&solo.agent.log).unwrap();
    assert!(
        log.contains("config reloaded: validate.expected_block_time: \"1m\" -> \"1s\""),
        "{log}"
    );
    let stall = wait_finding(
        &solo.q,
        "node-1",
        FindingKind::Stall,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        stall.summary.contains("expected one every 1s"),
        "{}",
        stall.summary
    );
    let n = node(&mut solo.q, "node-1").await.unwrap();
    assert_eq!(n.network, "devnet", "network changes only with a restart");
    assert!(solo.agent.running());
}
