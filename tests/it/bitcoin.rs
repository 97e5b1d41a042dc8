//! The Bitcoin Core source against a fixture node: a JSON-RPC server on
//! loopback that answers Bitcoin Core's calls, in Bitcoin Core's reply
//! shapes, from the real mainnet headers of blocks 0 to 2016
//! (tests/fixtures/bitcoin/). The test moves its tip, flips a bit in one
//! header, stops it, and makes it answer garbage.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use outpost::chain::bitcoin::RawHeader;
use outpost::proto::{FindingKind, FindingState, Severity};
use serde_json::{json, Value};

use crate::harness::{hex, http_fixture, wait_for, Agent, AgentOptions, Aggregator, World};
use crate::spine::{findings, node, wait_finding};

pub const COOKIE: &str = "__cookie__:5f2d1c0e8a";

/// A Bitcoin Core node made of recorded headers.
pub struct FixtureNode {
    headers: Vec<RawHeader>,
    pub tip: AtomicU64,
    /// A height whose header is served with one bit flipped.
    flipped: AtomicU64,
    pub garbage: AtomicBool,
}

impl FixtureNode {
    pub fn load() -> FixtureNode {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/bitcoin/headers-0-2016.hex"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
            panic!("{path}: {e} (the recorded mainnet headers are part of the repository)")
        });
        let headers: Vec<RawHeader> = text
            .lines()
            .map(|l| RawHeader::from_hex(l.trim()).expect("an 80-byte header per line"))
            .collect();
        assert_eq!(headers.len(), 2017);
        FixtureNode {
            headers,
            tip: AtomicU64::new(0),
            flipped: AtomicU64::new(u64::MAX),
            garbage: AtomicBool::new(false),
        }
    }

    pub fn hash_hex(&self, h: u64) -> String {
        hex(&self.headers[h as usize].hash().0)[2..].to_string()
    }

    fn answer(&self, req: &Value) -> Result<Value, (i64, &'static str)> {
        let tip = self.tip.load(SeqCst);
        let p = &req["params"];
        match req["method"].as_str().unwrap_or("") {
            // Shapes as Bitcoin Core's RPC reference documents them.
            "getblockchaininfo" => Ok(json!({
                "chain": "main",
                "blocks": tip,
                "headers": tip,
                "bestblockhash": self.hash_hex(tip),
                "difficulty": 1,
                "time": self.headers[tip as usize].time(),
                "mediantime": self.headers[tip as usize].time(),
                "verificationprogress": 1.0,
                "initialblockdownload": false,
                "chainwork": "0",
                "size_on_disk": 0,
                "pruned": false,
                "warnings": []
            })),
            "getblockhash" => match p[0].as_u64() {
                Some(h) if h <= tip => Ok(json!(self.hash_hex(h))),
                _ => Err((-8, "Block height out of range")),
            },
            "getblockheader" => {
                let want = p[0].as_str().unwrap_or("");
                let Some(h) = (0..=tip).find(|h| self.hash_hex(*h) == want) else {
                    return Err((-5, "Block not found"));
                };
                let mut bytes = self.headers[h as usize].bytes;
                if h == self.flipped.load(SeqCst) {
                    bytes[79] ^= 0x01; // the nonce's top bit
                }
                Ok(json!(hex(&bytes)[2..]))
            }
            "getconnectioncount" => Ok(json!(8)),
            "getmempoolinfo" => {
                Ok(json!({"loaded": true, "size": 1234, "bytes": 456789, "usage": 1000000}))
            }
            _ => Err((-32601, "Method not found")),
        }
    }
}

pub async fn serve(node: Arc<FixtureNode>) -> String {
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(COOKIE)
    );
    http_fixture(move |req| {
        let authorized = req
            .headers
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == auth.as_bytes());
        let reply = if !authorized {
            (401, Vec::new())
        } else if node.garbage.load(SeqCst) {
            (200, b"<html>502 Bad Gateway</html>".to_vec())
        } else {
            let request: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let (status, out) = match node.answer(&request) {
                Ok(result) => (200, json!({"result": result, "error": null, "id": request["id"]})),
                Err((code, message)) => (
                    if code == -32601 { 404 } else { 500 },
                    json!({"result": null, "error": {"code": code, "message": message}, "id": request["id"]}),
                ),
            };
            (status, serde_json::to_vec(&out).unwrap())
        };
        async move { reply }
    })
    .await
}

/// `[source]` lines for a cookie file holding `cookie`, expecting `network`.
pub fn cookie_source(world: &World, cookie: &str, network: &str) -> &'static str {
    let path = world.path().join(format!("{network}.cookie"));
    std::fs::write(&path, cookie).unwrap();
    let lines = format!(
        "cookie_file = \"{}\"\nnetwork_id = \"{network}\"",
        path.display()
    );
    Box::leak(lines.into_boxed_str())
}

#[tokio::test]
async fn bitcoin_headers_grow_verify_and_a_flipped_bit_a_stall_and_garbage_are_found() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let node_data = Arc::new(FixtureNode::load());
    node_data.tip.store(100, SeqCst);
    node_data.flipped.store(250, SeqCst);
    let url = serve(node_data.clone()).await;
    let source = cookie_source(&world, COOKIE, "main");
    let agent = Agent::start(
        &world,
        "btc-1",
        &url,
        &agg,
        AgentOptions {
            kind: "bitcoin",
            extra_source: source,
            extra_validate: "level = \"full\"",
            block_time: "1s",
            ..Default::default()
        },
    );
    let q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];

    // Steady growth to 300, ten blocks at a time.
    for tip in (110..=300).step_by(10) {
        node_data.tip.store(tip, SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let want = format!("0x{}", node_data.hash_hex(300));
    wait_for(
        "btc-1 at 300 with the mainnet hash",
        Duration::from_secs(30),
        &logs,
        || {
            let mut c = q.clone();
            let want = want.clone();
            async move {
                let n = node(&mut c, "btc-1").await?;
                let h = n.head?;
                (h.height == 300 && hex(&h.hash) == want).then_some(())
            }
        },
    )
    .await;
    let f = wait_finding(
        &q,
        "btc-1",
        FindingKind::InvalidHeader,
        FindingState::Occurred,
        &logs,
    )
    .await;
    assert_eq!(f.height, 250);
    assert_eq!(f.severity(), Severity::Critical);
    assert!(
        f.summary.contains("served hash does not match"),
        "{}",
        f.summary
    );
    let mut c = q.clone();
    let all = findings(&mut c, "btc-1", FindingKind::InvalidHeader).await;
    assert_eq!(
        all.len(),
        1,
        "every other real header verifies, proof of work included: {all:?}"
    );
    let status = c
        .get_node(outpost::proto::GetNodeRequest {
            node_id: "btc-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!((status.peers, status.mempool_size), (Some(8), Some(1234)));

    // The tip stops: a stall; it moves again: resolved.
    let stall = wait_finding(&q, "btc-1", FindingKind::Stall, FindingState::Open, &logs).await;
    node_data.tip.store(301, SeqCst);
    let resumed = wait_finding(
        &q,
        "btc-1",
        FindingKind::Stall,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(resumed.id, stall.id);

    // Garbage replies: unreachable with the cause; the agent stays up.
    node_data.garbage.store(true, SeqCst);
    let down = wait_finding(
        &q,
        "btc-1",
        FindingKind::Unreachable,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(down.summary.contains("malformed reply"), "{}", down.summary);
    node_data.garbage.store(false, SeqCst);
    wait_finding(
        &q,
        "btc-1",
        FindingKind::Unreachable,
        FindingState::Resolved,
        &logs,
    )
    .await;
}

#[tokio::test]
async fn a_wrong_cookie_is_unreachable_and_another_network_is_refused() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let node_data = Arc::new(FixtureNode::load());
    node_data.tip.store(10, SeqCst);
    let url = serve(node_data).await;
    let source = cookie_source(&world, "__cookie__:not-the-one", "main");
    let wrong = Agent::start(
        &world,
        "btc-wrong",
        &url,
        &agg,
        AgentOptions {
            kind: "bitcoin",
            extra_source: source,
            ..Default::default()
        },
    );
    let q = world.query(&agg).await;
    let logs = [wrong.log.as_path(), agg.log.as_path()];
    let f = wait_finding(
        &q,
        "btc-wrong",
        FindingKind::Unreachable,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(f.summary.contains("HTTP status 401"), "{}", f.summary);
    let log = std::fs::read_to_string(&wrong.log).unwrap();
    assert!(
        !log.contains("not-the-one"),
        "the secret never reaches the log"
    );

    let source = cookie_source(&world, COOKIE, "test");
    let mut testnet = Agent::start(
        &world,
        "btc-test",
        &url,
        &agg,
        AgentOptions {
            kind: "bitcoin",
            extra_source: source,
            ..Default::default()
        },
    );
    let log_path = testnet.log.clone();
    let logs = [log_path.as_path()];
    let status = wait_for("the agent to exit", Duration::from_secs(30), &logs, || {
        let s = testnet.exited();
        async move { s }
    })
    .await;
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("is on network main, but the config expects test"),
        "{log}"
    );
}
