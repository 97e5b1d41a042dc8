//! The TON source against a fixture HTTP API in the shapes of toncenter's
//! v2 API reference (getMasterchainInfo, getBlockHeader; `{"ok", "result"}`
//! replies, base64 root hashes, the `X-API-Key` header).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use outpost::proto::{FindingKind, FindingState};
use serde_json::{json, Value};

use crate::harness::{
    hex, http_fixture_with_switch, wait_for, Agent, AgentOptions, Aggregator, World,
};
use crate::spine::{goes_away_and_returns, node, wait_final_reorg, wait_finding};

const KEY: &str = "8c1f0e6b2a";

struct FixtureApi {
    tip: AtomicU64,
    garbage: AtomicBool,
    /// Seqnos from here on are served with other hashes (a rewritten
    /// masterchain, which TON's finality forbids).
    rewritten_from: AtomicU64,
    /// While on, the server drops every connection: the node is gone.
    pub down: Arc<AtomicBool>,
}

impl FixtureApi {
    fn root_hash(&self, seqno: u64) -> String {
        let fork = u8::from(seqno >= self.rewritten_from.load(SeqCst));
        let d = ring::digest::digest(
            &ring::digest::SHA256,
            format!("ton/{fork}/{seqno}").as_bytes(),
        );
        base64::engine::general_purpose::STANDARD.encode(d.as_ref())
    }

    fn block_id(&self, seqno: u64) -> Value {
        json!({"@type": "ton.blockIdExt", "workchain": -1, "shard": "-9223372036854775808",
               "seqno": seqno, "root_hash": self.root_hash(seqno),
               "file_hash": self.root_hash(seqno + 1_000_000)})
    }

    fn answer(&self, path: &str, query: &str) -> (u16, Value) {
        let tip = self.tip.load(SeqCst);
        match path {
            "/getMasterchainInfo" => (
                200,
                json!({"ok": true, "result": {
                "@type": "blocks.masterchainInfo", "last": self.block_id(tip),
                "state_root_hash": self.root_hash(tip + 2_000_000), "init": self.block_id(0)}}),
            ),
            "/getBlockHeader" => {
                let seqno = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("seqno="))
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                if seqno == 0 || seqno > tip {
                    return (
                        500,
                        json!({"ok": false, "error": "LITE_SERVER_UNKNOWN: block is not applied", "code": 500}),
                    );
                }
                (
                    200,
                    json!({"ok": true, "result": {
                    "@type": "blocks.header", "id": self.block_id(seqno), "global_id": -239, "version": 0,
                    "after_merge": false, "after_split": false, "before_split": false,
                    "want_merge": true, "want_split": false, "validator_list_hash_short": 1,
                    "catchain_seqno": 7, "min_ref_mc_seqno": seqno - 1, "is_key_block": false,
                    "prev_key_block_seqno": 1, "start_lt": "1000", "end_lt": "1004",
                    "gen_utime": 1_700_000_000 + 5 * seqno, "prev_blocks": [self.block_id(seqno - 1)]}}),
                )
            }
            _ => (404, json!({"ok": false, "error": "Not Found", "code": 404})),
        }
    }
}

async fn serve(api: Arc<FixtureApi>) -> String {
    let api_down = api.down.clone();
    let url = http_fixture_with_switch(
        move |req| {
            let keyed = req.headers.get("x-api-key").is_some_and(|v| v == KEY);
            let reply = if !keyed {
                (
                    401,
                    b"{\"ok\": false, \"error\": \"API key required\", \"code\": 401}".to_vec(),
                )
            } else if api.garbage.load(SeqCst) {
                (200, b"<!doctype html><title>maintenance</title>".to_vec())
            } else {
                let (status, v) = api.answer(req.path.trim_start_matches("/api/v2"), &req.query);
                (status, serde_json::to_vec(&v).unwrap())
            };
            async move { reply }
        },
        api_down,
    )
    .await;
    format!("{url}/api/v2")
}

#[tokio::test]
async fn ton_masterchain_grows_links_stalls_and_breaks() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let api = Arc::new(FixtureApi {
        tip: AtomicU64::new(100),
        garbage: AtomicBool::new(false),
        down: Default::default(),
        rewritten_from: AtomicU64::new(u64::MAX),
    });
    let url = serve(api.clone()).await;
    let key_file = world.path().join("toncenter.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let source: &'static str = Box::leak(
        format!(
            "token_file = \"{}\"\nnetwork_id = \"-239\"",
            key_file.display()
        )
        .into_boxed_str(),
    );
    let agent = Agent::start(
        &world,
        "ton-1",
        &url,
        &agg,
        AgentOptions {
            kind: "ton",
            network: "ton-mainnet",
            extra_source: source,
            block_time: "1s",
            ..Default::default()
        },
    );
    let q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    for tip in 101..=120 {
        api.tip.store(tip, SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let want = hex(&base64::engine::general_purpose::STANDARD
        .decode(api.root_hash(120))
        .unwrap());
    wait_for("ton-1 at 120", Duration::from_secs(30), &logs, || {
        let mut c = q.clone();
        let want = want.clone();
        async move {
            let h = node(&mut c, "ton-1").await?.head?;
            (h.height == 120 && hex(&h.hash) == want).then_some(())
        }
    })
    .await;
    let stall = wait_finding(&q, "ton-1", FindingKind::Stall, FindingState::Open, &logs).await;
    api.tip.store(121, SeqCst);
    let resumed = wait_finding(
        &q,
        "ton-1",
        FindingKind::Stall,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(resumed.id, stall.id);

    // Seqnos 119..=121 come back with other hashes and the chain moves on:
    // masterchain blocks are final, so this is critical.
    api.rewritten_from.store(119, SeqCst);
    api.tip.store(122, SeqCst);
    wait_final_reorg(&q, "ton-1", &logs, 118, 3).await;

    // The node goes away (its connections close unanswered), then returns.
    goes_away_and_returns(&q, "ton-1", &api.down, &logs).await;

    api.garbage.store(true, SeqCst);
    let down = wait_finding(
        &q,
        "ton-1",
        FindingKind::Unreachable,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(down.summary.contains("malformed reply"), "{}", down.summary);
}
