//! The CometBFT source against a fixture node that answers CometBFT's
//! JSON-RPC calls in the shapes its RPC documentation gives
//! (docs.cometbft.com: status, block, net_info, num_unconfirmed_txs), over a
//! chain the test grows, rewrites, stops and breaks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use outpost::proto::{FindingKind, FindingState, GetNodeRequest};
use serde_json::{json, Value};

use crate::harness::{
    hex, http_fixture_with_switch, wait_for, Agent, AgentOptions, Aggregator, World,
};
use crate::spine::{goes_away_and_returns, node, wait_final_reorg, wait_finding};

pub struct FixtureChain {
    pub tip: AtomicU64,
    /// Heights from here on are served with other hashes (a rewritten
    /// committed chain).
    pub rewritten_from: AtomicU64,
    pub garbage: AtomicBool,
    /// While on, the server drops every connection: the node is gone.
    pub down: Arc<AtomicBool>,
}

impl FixtureChain {
    /// A chain at `tip`, healthy and never rewritten.
    pub fn at(tip: u64) -> Arc<FixtureChain> {
        Arc::new(FixtureChain {
            tip: AtomicU64::new(tip),
            rewritten_from: AtomicU64::new(u64::MAX),
            garbage: AtomicBool::new(false),
            down: Default::default(),
        })
    }

    pub fn hash(&self, h: u64) -> String {
        let fork = u8::from(h >= self.rewritten_from.load(SeqCst));
        let d = ring::digest::digest(
            &ring::digest::SHA256,
            format!("cosmoshub-4/{fork}/{h}").as_bytes(),
        );
        hex(d.as_ref())[2..].to_uppercase()
    }

    fn time(h: u64) -> String {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + 6 * h);
        humantime::format_rfc3339_nanos(t).to_string()
    }

    fn answer(&self, req: &Value) -> Result<Value, Value> {
        let tip = self.tip.load(SeqCst);
        match req["method"].as_str().unwrap_or("") {
            "status" => Ok(json!({
                "node_info": {"network": "cosmoshub-4", "version": "0.38.12", "moniker": "fixture"},
                "sync_info": {
                    "latest_block_hash": self.hash(tip),
                    "latest_app_hash": "0000000000000000000000000000000000000000000000000000000000000000",
                    "latest_block_height": tip.to_string(),
                    "latest_block_time": Self::time(tip),
                    "earliest_block_height": "1",
                    "catching_up": false
                },
                "validator_info": {"voting_power": "0"}
            })),
            "block" => {
                let h: u64 = req["params"]["height"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if h == 0 || h > tip {
                    return Err(json!({"code": -32603, "message": "Internal error",
                        "data": format!("height {h} must be less than or equal to the current blockchain height {tip}")}));
                }
                let last = if h == 1 {
                    String::new()
                } else {
                    self.hash(h - 1)
                };
                Ok(json!({
                    "block_id": {"hash": self.hash(h), "parts": {"total": 1, "hash": self.hash(h)}},
                    "block": {
                        "header": {
                            "version": {"block": "11", "app": "0"},
                            "chain_id": "cosmoshub-4",
                            "height": h.to_string(),
                            "time": Self::time(h),
                            "last_block_id": {"hash": last, "parts": {"total": 1, "hash": last}}
                        },
                        "data": {"txs": []},
                        "evidence": {"evidence": []},
                        "last_commit": null
                    }
                }))
            }
            "net_info" => {
                Ok(json!({"listening": true, "listeners": [], "n_peers": "3", "peers": []}))
            }
            "num_unconfirmed_txs" => Ok(json!({"n_txs": "7", "total": "7", "total_bytes": "2100"})),
            _ => Err(json!({"code": -32601, "message": "Method not found"})),
        }
    }
}

pub async fn serve(chain: Arc<FixtureChain>) -> String {
    let chain_down = chain.down.clone();
    http_fixture_with_switch(
        move |req| {
            let out = if chain.garbage.load(SeqCst) {
                b"{\"jsonrpc\": \"2.0\", \"result\": {\"sync_info\": 17".to_vec()
            } else {
                let request: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                let reply = match chain.answer(&request) {
                    Ok(r) => json!({"jsonrpc": "2.0", "id": request["id"], "result": r}),
                    Err(e) => json!({"jsonrpc": "2.0", "id": request["id"], "error": e}),
                };
                serde_json::to_vec(&reply).unwrap()
            };
            async move { (200, out) }
        },
        chain_down,
    )
    .await
}

#[tokio::test]
async fn cometbft_growth_a_rewritten_committed_block_a_stall_and_garbage() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let chain = FixtureChain::at(5);
    let url = serve(chain.clone()).await;
    let agent = Agent::start(
        &world,
        "cosmos-1",
        &url,
        &agg,
        AgentOptions {
            kind: "cometbft",
            extra_source: "network_id = \"cosmoshub-4\"",
            block_time: "1s",
            ..Default::default()
        },
    );
    let q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    for tip in 6..=30 {
        chain.tip.store(tip, SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let want = format!("0x{}", chain.hash(30).to_lowercase());
    wait_for("cosmos-1 at 30", Duration::from_secs(30), &logs, || {
        let mut c = q.clone();
        let want = want.clone();
        async move {
            let h = node(&mut c, "cosmos-1").await?.head?;
            (h.height == 30 && hex(&h.hash) == want).then_some(())
        }
    })
    .await;
    let status = wait_for("peers and mempool", Duration::from_secs(20), &logs, || {
        let mut c = q.clone();
        async move {
            let s = c
                .get_node(GetNodeRequest {
                    node_id: "cosmos-1".into(),
                })
                .await
                .ok()?
                .into_inner()
                .status?;
            s.peers.is_some().then_some(s)
        }
    })
    .await;
    assert_eq!(
        (status.peers, status.mempool_size, status.syncing),
        (Some(3), Some(7), Some(false))
    );

    // Blocks 28..=30 are served with other hashes, and the chain moves on:
    // committed blocks changed, which CometBFT's finality forbids.
    chain.rewritten_from.store(28, SeqCst);
    chain.tip.store(31, SeqCst);
    wait_final_reorg(&q, "cosmos-1", &logs, 27, 3).await;

    let stall = wait_finding(
        &q,
        "cosmos-1",
        FindingKind::Stall,
        FindingState::Open,
        &logs,
    )
    .await;
    chain.tip.store(32, SeqCst);
    let resumed = wait_finding(
        &q,
        "cosmos-1",
        FindingKind::Stall,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(resumed.id, stall.id);

    // The node goes away (its connections close unanswered), then returns.
    goes_away_and_returns(&q, "cosmos-1", &chain.down, &logs).await;

    chain.garbage.store(true, SeqCst);
    let down = wait_finding(
        &q,
        "cosmos-1",
        FindingKind::Unreachable,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(down.summary.contains("malformed reply"), "{}", down.summary);
    chain.garbage.store(false, SeqCst);
    wait_finding(
        &q,
        "cosmos-1",
        FindingKind::Unreachable,
        FindingState::Resolved,
        &logs,
    )
    .await;
}
