//! The Algorand source against a fixture algod in the shapes of algod's v2
//! REST reference (`/v2/status`, `/v2/blocks/{round}`,
//! `/v2/blocks/{round}/hash`, `/v2/transactions/pending`; kebab-case
//! fields, base32 block hashes, `prev` as `blk-...`, the
//! `X-Algo-API-Token` header).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use data_encoding::BASE32_NOPAD;
use outpost::proto::{FindingKind, FindingState, GetNodeRequest};
use serde_json::{json, Value};

use crate::harness::{
    hex, http_fixture_with_switch, wait_for, Agent, AgentOptions, Aggregator, World,
};
use crate::spine::{goes_away_and_returns, node, wait_final_reorg, wait_finding};

const TOKEN: &str = "aaaa1111bbbb2222cccc3333dddd4444eeee5555ffff6666aaaa1111bbbb2222";

struct FixtureAlgod {
    tip: AtomicU64,
    catching_up: AtomicBool,
    garbage: AtomicBool,
    /// Rounds from here on are served with other hashes (rewritten
    /// history, which Algorand's finality forbids).
    rewritten_from: AtomicU64,
    /// While on, the server drops every connection: the node is gone.
    pub down: Arc<AtomicBool>,
}

impl FixtureAlgod {
    fn block_hash(&self, round: u64) -> Vec<u8> {
        let fork = u8::from(round >= self.rewritten_from.load(SeqCst));
        ring::digest::digest(
            &ring::digest::SHA256,
            format!("algo/{fork}/{round}").as_bytes(),
        )
        .as_ref()
        .to_vec()
    }

    fn answer(&self, path: &str) -> (u16, Value) {
        let tip = self.tip.load(SeqCst);
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["v2", "status"] => (
                200,
                json!({
                "last-round": tip, "last-version": "https://github.com/algorandfoundation/specs/tree/v38",
                "next-version": "https://github.com/algorandfoundation/specs/tree/v38",
                "next-version-round": tip + 1, "next-version-supported": true,
                "time-since-last-round": 1_200_000_000u64,
                "catchup-time": if self.catching_up.load(SeqCst) { 5_000_000_000u64 } else { 0 },
                "stopped-at-unsupported-round": false}),
            ),
            ["v2", "transactions", "pending"] => (
                200,
                json!({"top-transactions": [], "total-transactions": 42}),
            ),
            ["v2", "blocks", r, rest @ ..] => {
                let Some(round) = r.parse::<u64>().ok().filter(|r| *r <= tip) else {
                    return (
                        404,
                        json!({"message": "failed to retrieve information from the ledger"}),
                    );
                };
                match rest {
                    ["hash"] => (
                        200,
                        json!({"blockHash": BASE32_NOPAD.encode(&self.block_hash(round))}),
                    ),
                    [] => {
                        let mut b = json!({"rnd": round, "ts": 1_700_000_000 + 3 * round,
                            "gen": "mainnet-v1.0", "gh": "wGHE2Pwdvd7S12BL5FaOP20EGYesN73ktiC1qzkkit8=",
                            "proto": "https://github.com/algorandfoundation/specs/tree/v38",
                            "seed": "AAAA", "txn256": "AAAA"});
                        if round > 0 {
                            b["prev"] = json!(format!(
                                "blk-{}",
                                BASE32_NOPAD.encode(&self.block_hash(round - 1))
                            ));
                        }
                        (200, json!({"block": b}))
                    }
                    _ => (404, json!({"message": "Not Found"})),
                }
            }
            _ => (404, json!({"message": "Not Found"})),
        }
    }
}

async fn serve(algod: Arc<FixtureAlgod>) -> String {
    let algod_down = algod.down.clone();
    http_fixture_with_switch(
        move |req| {
            let authorized = req
                .headers
                .get("x-algo-api-token")
                .is_some_and(|v| v == TOKEN);
            let reply = if !authorized {
                (401, b"{\"message\":\"Invalid API Token\"}".to_vec())
            } else if algod.garbage.load(SeqCst) {
                (200, b"\x1f\x8b not json".to_vec())
            } else {
                let (status, v) = algod.answer(&req.path);
                (status, serde_json::to_vec(&v).unwrap())
            };
            async move { reply }
        },
        algod_down,
    )
    .await
}

#[tokio::test]
async fn algorand_rounds_grow_link_catch_up_and_break() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let algod = Arc::new(FixtureAlgod {
        tip: AtomicU64::new(1000),
        catching_up: AtomicBool::new(false),
        garbage: AtomicBool::new(false),
        down: Default::default(),
        rewritten_from: AtomicU64::new(u64::MAX),
    });
    let url = serve(algod.clone()).await;
    let token_file = world.path().join("algod.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let source: &'static str = Box::leak(
        format!(
            "token_file = \"{}\"\nnetwork_id = \"mainnet-v1.0\"",
            token_file.display()
        )
        .into_boxed_str(),
    );
    let agent = Agent::start(
        &world,
        "algo-1",
        &url,
        &agg,
        AgentOptions {
            kind: "algorand",
            network: "algorand-mainnet",
            extra_source: source,
            block_time: "1s",
            ..Default::default()
        },
    );
    let q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    for tip in 1001..=1020 {
        algod.tip.store(tip, SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let want = hex(&algod.block_hash(1020));
    wait_for("algo-1 at 1020", Duration::from_secs(30), &logs, || {
        let mut c = q.clone();
        let want = want.clone();
        async move {
            let h = node(&mut c, "algo-1").await?.head?;
            (h.height == 1020 && hex(&h.hash) == want).then_some(())
        }
    })
    .await;
    algod.catching_up.store(true, SeqCst);
    wait_finding(
        &q,
        "algo-1",
        FindingKind::Syncing,
        FindingState::Open,
        &logs,
    )
    .await;
    let mut c = q.clone();
    let status = c
        .get_node(GetNodeRequest {
            node_id: "algo-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.mempool_size, Some(42));
    algod.catching_up.store(false, SeqCst);
    wait_finding(
        &q,
        "algo-1",
        FindingKind::Syncing,
        FindingState::Resolved,
        &logs,
    )
    .await;
    // The round stays put: a stall; it moves on with rounds 1019..=1021
    // rewritten: resolved, and a critical finding for changed final blocks.
    let stall = wait_finding(&q, "algo-1", FindingKind::Stall, FindingState::Open, &logs).await;
    algod.rewritten_from.store(1019, SeqCst);
    algod.tip.store(1021, SeqCst);
    let resumed = wait_finding(
        &q,
        "algo-1",
        FindingKind::Stall,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(resumed.id, stall.id);
    wait_final_reorg(&q, "algo-1", &logs, 1018, 2).await;

    // The node goes away (its connections close unanswered), then returns.
    goes_away_and_returns(&q, "algo-1", &algod.down, &logs).await;

    algod.garbage.store(true, SeqCst);
    let down = wait_finding(
        &q,
        "algo-1",
        FindingKind::Unreachable,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(down.summary.contains("malformed reply"), "{}", down.summary);
}
