//! Peers that lie on purpose: a node that reports absurd heights, and two
//! agent processes that share one node's certificate.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::proto::{FindingKind, FindingState, GetNodeRequest, ListNodesRequest};
use serde_json::{json, Value};

use crate::harness::{http_fixture, wait_for, Agent, AgentOptions, Aggregator, Anvil, World};
use crate::spine::{node, wait_finding};

/// An Ethereum JSON-RPC node whose chain has one hash per height and whose
/// head is whatever `head` holds.
async fn told_node(head: Arc<AtomicU64>) -> String {
    let hash = |h: u64| format!("0x{:048x}{h:016x}", 0xabu64);
    http_fixture(move |req| {
        let head = head.clone();
        async move {
            let r: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let result = match r["method"].as_str().unwrap_or("") {
                "eth_blockNumber" => json!(format!("0x{:x}", head.load(SeqCst))),
                "eth_getBlockByNumber" => {
                    let s = r["params"][0].as_str().unwrap_or("0x0");
                    let h = u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or(0);
                    json!({
                        "number": format!("0x{h:x}"),
                        "hash": hash(h),
                        "parentHash": hash(h.wrapping_sub(1)),
                        "timestamp": format!("0x{:x}", outpost::model::now_unix_ms() / 1000),
                    })
                }
                "eth_chainId" => json!("0x7a69"),
                "eth_syncing" => json!(false),
                _ => {
                    return (
                        200,
                        serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": r["id"], "error": {"code": -32601, "message": "no such method"}})).unwrap(),
                    )
                }
            };
            (
                200,
                serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": r["id"], "result": result}))
                    .unwrap(),
            )
        }
    })
    .await
}

#[tokio::test]
async fn a_node_that_reports_absurd_heights_is_flagged_and_blinds_nobody() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let head = Arc::new(AtomicU64::new(1 << 60));
    let url = told_node(head.clone()).await;
    let mut liar = Agent::start(&world, "liar", &url, &agg, AgentOptions::default());
    let mut honest = Agent::start(&world, "honest", &anvil.url(), &agg, Default::default());
    let mut q = world.query(&agg).await;
    let (liar_log, honest_log) = (liar.log.clone(), honest.log.clone());
    let logs = [liar_log.as_path(), honest_log.as_path(), agg.log.as_path()];

    // 2^60 on a fresh store: flagged, not stored.
    let f = wait_finding(
        &q,
        "liar",
        FindingKind::ImplausibleHead,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        f.summary.contains("no chain can have reached"),
        "{}",
        f.summary
    );
    // Then an honest height: the finding resolves and the head is stored.
    head.store(5, SeqCst);
    wait_finding(
        &q,
        "liar",
        FindingKind::ImplausibleHead,
        FindingState::Resolved,
        &logs,
    )
    .await;
    wait_for("liar's head at 5", Duration::from_secs(30), &logs, || {
        let mut c = q.clone();
        async move {
            node(&mut c, "liar")
                .await
                .filter(|n| n.head.as_ref().is_some_and(|h| h.height == 5))
        }
    })
    .await;
    // A head near u64::MAX, and one far above what 12 s blocks allow: the
    // agent stays up and keeps its stored head.
    for lie in [u64::MAX - 3, 5 + 100_000_000] {
        head.store(lie, SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let d = q
            .get_node(GetNodeRequest {
                node_id: "liar".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            d.open_findings
                .iter()
                .any(|f| f.kind() == FindingKind::ImplausibleHead),
            "lie {lie}: {:?}",
            d.open_findings
        );
        assert_eq!(d.summary.unwrap().head.unwrap().height, 5, "lie {lie}");
        assert!(liar.running(), "the agent survives head {lie}");
    }
    // The rest of the fleet stays queryable within a second throughout.
    anvil.mine(3).await;
    crate::spine::wait_at_head(&mut q, &anvil, &honest, &agg).await;
    let started = Instant::now();
    q.list_nodes(ListNodesRequest {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(honest.running() && liar.running());
}

#[tokio::test]
async fn a_second_agent_with_one_node_id_is_refused_and_loses_nothing() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    anvil.mine(2).await;
    let agg = Aggregator::start(&world).await;
    let mut first = Agent::start(&world, "node-1", &anvil.url(), &agg, Default::default());
    let mut q = world.query(&agg).await;
    crate::spine::wait_at_head(&mut q, &anvil, &first, &agg).await;

    // A clone: the same certificate and config, its own data dir.
    let clone_cfg = world.path().join("clone.toml");
    let text = std::fs::read_to_string(&first.config).unwrap().replace(
        &format!("data_dir = \"{}\"", first.data_dir.display()),
        &format!(
            "data_dir = \"{}\"",
            world.path().join("clone-data").display()
        ),
    );
    std::fs::write(&clone_cfg, text).unwrap();
    let clone_log = world.path().join("clone.log");
    let mut clone = crate::harness::spawn_agent(&clone_cfg, &clone_log);
    let first_log = first.log.clone();
    let logs = [first_log.as_path(), clone_log.as_path(), agg.log.as_path()];
    let f = wait_finding(
        &q,
        "node-1",
        FindingKind::DuplicateAgent,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(f.summary.contains("second agent"), "{}", f.summary);
    let clone_text = std::fs::read_to_string(&clone_log).unwrap();
    assert!(
        clone_text.contains("aggregator refused the stream: another agent")
            && clone_text.contains("is streaming as node"),
        "the refused agent says why: {clone_text}"
    );
    let audit = std::fs::read_to_string(&agg.log).unwrap();
    assert!(
        audit.contains("refused: a second agent with this node id"),
        "{audit}"
    );

    // The clone keeps what it read; once the first stops, it takes over
    // and delivers it, with seqs that follow the first agent's.
    anvil.mine(2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.terminate();
    let top = anvil.head().await;
    wait_for(
        "the clone delivers its events",
        Duration::from_secs(60),
        &logs,
        || {
            let mut c = q.clone();
            async move {
                node(&mut c, "node-1")
                    .await
                    .filter(|n| n.connected && n.head.as_ref().is_some_and(|h| h.height == top))
            }
        },
    )
    .await;
    let d = q
        .get_node(GetNodeRequest {
            node_id: "node-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.missing_events, 0, "no seq gap: nothing lost");
    let _ = clone.kill();
    let _ = clone.wait();
}
