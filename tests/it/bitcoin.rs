//! The Bitcoin Core source against a fixture node: a JSON-RPC server on
//! loopback that answers Bitcoin Core's calls, in Bitcoin Core's reply
//! shapes, from the real mainnet headers of blocks 0 to 2016
//! (tests/fixtures/bitcoin/). The test moves its tip, flips a bit in one
//! header, stops it, and makes it answer garbage. For a reorg it grows a
//! branch beside the real chain: those headers are made here (mainnet has
//! no stale blocks in this range), link to each other and to the real
//! fork point, and lack valid proof of work, which level `standard` does
//! not check.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use outpost::chain::bitcoin::RawHeader;
use outpost::proto::{FindingKind, FindingState, Severity};
use serde_json::{json, Value};

use crate::harness::{
    hex, http_fixture_with_switch, wait_for, Agent, AgentOptions, Aggregator, World,
};
use crate::spine::{findings, goes_away_and_returns, node, wait_finding, WAIT};

pub const COOKIE: &str = "__cookie__:5f2d1c0e8a";

/// A Bitcoin Core node made of recorded headers.
pub struct FixtureNode {
    headers: Vec<RawHeader>,
    pub tip: AtomicU64,
    /// A height whose header is served with one bit flipped.
    flipped: AtomicU64,
    pub garbage: AtomicBool,
    branch: Mutex<Branch>,
    /// While on, the server drops every connection: the node is gone.
    pub down: Arc<AtomicBool>,
}

/// A `getchaintips` entry that is not the active tip: height, header,
/// branch length, status.
type OtherTip = (u64, RawHeader, u64, &'static str);

/// Headers beside the real chain from `fork + 1` on, of which the node
/// knows the first `known`; `active` when the node has switched to them.
#[derive(Default)]
struct Branch {
    fork: u64,
    headers: Vec<RawHeader>,
    known: usize,
    active: bool,
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
            down: Default::default(),
            branch: Mutex::default(),
        }
    }

    pub fn hash_hex(&self, h: u64) -> String {
        display(&self.headers[h as usize])
    }

    /// Makes `len` headers that branch off the real chain after `fork`.
    fn grow_branch(&self, fork: u64, len: usize) {
        let mut b = self.branch.lock().unwrap();
        b.fork = fork;
        b.headers.clear();
        for i in 0..len {
            let mut h = self.headers[fork as usize + 1 + i].clone();
            let prev = b.headers.last().unwrap_or(&self.headers[fork as usize]);
            let mut prev_internal = prev.hash().0;
            prev_internal.reverse();
            h.bytes[4..36].copy_from_slice(&prev_internal);
            h.bytes[76] ^= 0x5a; // another nonce: another block
            b.headers.push(h);
        }
    }

    /// The node knows the first `known` branch headers, and follows them
    /// when `active`.
    fn show_branch(&self, known: usize, active: bool) {
        let mut b = self.branch.lock().unwrap();
        b.known = known;
        b.active = active;
    }

    fn branch_hash(&self, i: usize) -> String {
        display(&self.branch.lock().unwrap().headers[i])
    }

    /// The active chain, and the tip of the other branch the node knows.
    fn chains(&self) -> (Vec<RawHeader>, Option<OtherTip>) {
        let tip = self.tip.load(SeqCst) as usize;
        let real = &self.headers[..=tip];
        let b = self.branch.lock().unwrap();
        let branch = &b.headers[..b.known];
        let fork = b.fork as usize;
        if branch.is_empty() {
            return (real.to_vec(), None);
        }
        let branch_tip = (fork + branch.len()) as u64;
        if b.active {
            let mut chain = self.headers[..=fork].to_vec();
            chain.extend_from_slice(branch);
            let other = (
                tip as u64,
                real[tip].clone(),
                (tip - fork) as u64,
                "valid-fork",
            );
            (chain, Some(other))
        } else {
            let other = (
                branch_tip,
                branch[branch.len() - 1].clone(),
                branch.len() as u64,
                "valid-headers",
            );
            (real.to_vec(), Some(other))
        }
    }

    fn answer(&self, req: &Value) -> Result<Value, (i64, &'static str)> {
        let (chain, other) = self.chains();
        let tip = chain.len() as u64 - 1;
        let p = &req["params"];
        match req["method"].as_str().unwrap_or("") {
            // Shapes as Bitcoin Core's RPC reference documents them.
            "getblockchaininfo" => Ok(json!({
                "chain": "main",
                "blocks": tip,
                "headers": tip,
                "bestblockhash": display(&chain[tip as usize]),
                "difficulty": 1,
                "time": chain[tip as usize].time(),
                "mediantime": chain[tip as usize].time(),
                "verificationprogress": 1.0,
                "initialblockdownload": false,
                "chainwork": "0",
                "size_on_disk": 0,
                "pruned": false,
                "warnings": []
            })),
            "getblockhash" => match p[0].as_u64() {
                Some(h) if h <= tip => Ok(json!(display(&chain[h as usize]))),
                _ => Err((-8, "Block height out of range")),
            },
            "getblockheader" => {
                // Any header the node knows, on the active chain or not.
                let want = p[0].as_str().unwrap_or("");
                let known = chain.iter().chain(other.as_ref().map(|o| &o.1));
                let real = self.headers.iter().take(self.tip.load(SeqCst) as usize + 1);
                let Some(found) = known.chain(real).find(|h| display(h) == want) else {
                    return Err((-5, "Block not found"));
                };
                let mut bytes = found.bytes;
                let flipped = self.flipped.load(SeqCst);
                if flipped < self.headers.len() as u64 && *found == self.headers[flipped as usize] {
                    bytes[79] ^= 0x01; // the nonce's top bit
                }
                Ok(json!(hex(&bytes)[2..]))
            }
            "getchaintips" => {
                let mut tips = vec![json!({"height": tip, "hash": display(&chain[tip as usize]),
                    "branchlen": 0, "status": "active"})];
                if let Some((height, h, branchlen, status)) = &other {
                    tips.push(json!({"height": height, "hash": display(h),
                        "branchlen": branchlen, "status": status}));
                }
                Ok(json!(tips))
            }
            "getconnectioncount" => Ok(json!(8)),
            "getmempoolinfo" => {
                Ok(json!({"loaded": true, "size": 1234, "bytes": 456789, "usage": 1000000}))
            }
            _ => Err((-32601, "Method not found")),
        }
    }
}

/// A header's hash as Bitcoin Core shows it.
fn display(h: &RawHeader) -> String {
    hex(&h.hash().0)[2..].to_string()
}

pub async fn serve(node: Arc<FixtureNode>) -> String {
    let node_down = node.down.clone();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(COOKIE)
    );
    http_fixture_with_switch(move |req| {
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
    },
        node_down,
    )
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
    // The node goes away (its connections close unanswered), then returns.
    goes_away_and_returns(&q, "btc-1", &node_data.down, &logs).await;

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
async fn a_competing_tip_is_seen_then_takes_over_as_a_reorg() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let node_data = Arc::new(FixtureNode::load());
    node_data.tip.store(100, SeqCst);
    node_data.grow_branch(99, 5);
    let url = serve(node_data.clone()).await;
    let agent = Agent::start(
        &world,
        "btc-fork",
        &url,
        &agg,
        AgentOptions {
            kind: "bitcoin",
            extra_source: cookie_source(&world, COOKIE, "main"),
            // The branch keeps the height moving; no stall in this test.
            block_time: "30s",
            ..Default::default()
        },
    );
    let q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    let at = |height: u64, hash: String| {
        let q = q.clone();
        move || {
            let mut c = q.clone();
            let want = format!("0x{hash}");
            async move {
                let h = node(&mut c, "btc-fork").await?.head?;
                (h.height == height && hex(&h.hash) == want).then_some(())
            }
        }
    };
    wait_for(
        "btc-fork at 100",
        WAIT,
        &logs,
        at(100, node_data.hash_hex(100)),
    )
    .await;

    // A block at the same height arrives on another branch: it competes.
    node_data.show_branch(1, false);
    let tip = wait_finding(
        &q,
        "btc-fork",
        FindingKind::CompetingTip,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        tip.summary.contains(&node_data.branch_hash(0))
            && tip.summary.contains("height 100 (valid-headers"),
        "{}",
        tip.summary
    );

    // The branch grows past the real chain and the node switches: block 100
    // is replaced, 99 is the fork point.
    node_data.show_branch(2, true);
    wait_for(
        "btc-fork on the branch at 101",
        WAIT,
        &logs,
        at(101, node_data.branch_hash(1)),
    )
    .await;
    let mut c = q.clone();
    let reorgs = findings(&mut c, "btc-fork", FindingKind::Reorg).await;
    assert_eq!(reorgs.len(), 1, "{reorgs:?}");
    assert_eq!((reorgs[0].fork_point, reorgs[0].depth), (Some(99), Some(1)));
    assert!(
        reorgs[0].summary.contains(&node_data.hash_hex(100)),
        "names the replaced head: {}",
        reorgs[0].summary
    );

    // The old block falls behind by more than the window: no longer competing.
    node_data.show_branch(5, true);
    let gone = wait_finding(
        &q,
        "btc-fork",
        FindingKind::CompetingTip,
        FindingState::Resolved,
        &logs,
    )
    .await;
    assert_eq!(gone.id, tip.id);
    wait_for(
        "btc-fork on the branch at 104",
        WAIT,
        &logs,
        at(104, node_data.branch_hash(4)),
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
