//! New-head subscriptions over WebSocket: Ethereum's `eth_subscribe
//! newHeads` against real anvil, CometBFT's `NewBlock` events from a
//! fixture WebSocket server in the shapes of CometBFT's `subscribe` docs.
//! The agents poll once a minute, so a head that reaches the aggregator
//! within the wait came by subscription.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use outpost::proto::{FindingKind, FindingState};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::cometbft::{serve, FixtureChain};
use crate::harness::{free_port, hex, wait_for, Agent, AgentOptions, Aggregator, Anvil, World};
use crate::spine::{findings, node, stored_as_anvil, wait_at_head, WAIT};

fn ws_source(url: &str) -> &'static str {
    Box::leak(format!("ws_url = \"{url}\"").into_boxed_str())
}

#[tokio::test]
async fn ethereum_heads_arrive_by_subscription_and_a_reorg_is_seen() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let agent = Agent::start(
        &world,
        "eth-ws",
        &anvil.url(),
        &agg,
        AgentOptions {
            poll_interval: "60s",
            block_time: "60s",
            extra_source: ws_source(&format!("ws://127.0.0.1:{}", anvil.port)),
            ..Default::default()
        },
    );
    let mut q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    wait_at_head(&mut q, &anvil, &agent, &agg).await;
    wait_subscribed(&agent, &logs).await;

    anvil.mine(5).await;
    assert_eq!(wait_at_head(&mut q, &anvil, &agent, &agg).await, 5);

    // anvil_reorg replaces the top three blocks; the next block's notice
    // makes the agent walk back over them.
    let before = anvil.hash(5).await;
    anvil.rpc("anvil_reorg", json!([3, []])).await;
    anvil.mine(1).await;
    assert_eq!(wait_at_head(&mut q, &anvil, &agent, &agg).await, 6);
    let reorgs = findings(&mut q, "eth-ws", FindingKind::Reorg).await;
    assert_eq!(reorgs.len(), 1, "{reorgs:?}");
    assert_eq!((reorgs[0].depth, reorgs[0].fork_point), (Some(3), Some(2)));
    assert!(reorgs[0].summary.contains(&before), "{}", reorgs[0].summary);
    // The replaced heights hold anvil's new blocks.
    let stored = stored_as_anvil(&mut q, &anvil, "eth-ws", 3, 6).await;
    assert_eq!(stored.len(), 4);
    assert_ne!(hex(&stored[2].hash), before);
}

#[tokio::test]
async fn a_websocket_that_does_not_answer_leaves_polling_in_charge() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let agent = Agent::start(
        &world,
        "eth-nows",
        &anvil.url(),
        &agg,
        AgentOptions {
            extra_source: ws_source(&format!("ws://127.0.0.1:{}", free_port())),
            ..Default::default()
        },
    );
    let mut q = world.query(&agg).await;
    anvil.mine(3).await;
    assert_eq!(wait_at_head(&mut q, &anvil, &agent, &agg).await, 3);
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        log.contains("head subscription failed") && log.contains("polling continues"),
        "{log}"
    );
    let mut c = q.clone();
    let open = findings(&mut c, "eth-nows", FindingKind::Unreachable).await;
    assert!(
        open.is_empty(),
        "the RPC answers, so the node is reachable: {open:?}"
    );
}

/// A CometBFT `/websocket` endpoint: confirms a `subscribe` to NewBlock and
/// pushes an event whenever the test raises the tip.
async fn serve_events(chain: Arc<FixtureChain>, refuse: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/websocket", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let chain = chain.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let Some(Ok(Message::Text(req))) = ws.next().await else {
                    return;
                };
                let req: Value = serde_json::from_str(req.as_str()).unwrap_or(Value::Null);
                let id = req["id"].clone();
                let query = req["params"]["query"].as_str().unwrap_or("").to_string();
                let confirm = if refuse || query != "tm.event='NewBlock'" {
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603,
                        "message": "Internal error", "data": "max_subscriptions_per_client 5 reached"}})
                } else {
                    json!({"jsonrpc": "2.0", "id": id, "result": {}})
                };
                if ws.send(Message::text(confirm.to_string())).await.is_err() {
                    return;
                }
                let mut sent = chain.tip.load(SeqCst);
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    let tip = chain.tip.load(SeqCst);
                    while sent < tip {
                        sent += 1;
                        let event = json!({"jsonrpc": "2.0", "id": id, "result": {
                            "query": "tm.event='NewBlock'",
                            "data": {"type": "tendermint/event/NewBlock", "value": {
                                "block": {"header": {"chain_id": "cosmoshub-4",
                                    "height": sent.to_string()}},
                                "result_finalize_block": {}}},
                            "events": {"tm.event": ["NewBlock"]}}});
                        if ws.send(Message::text(event.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    url
}

/// A CometBFT fixture at height 5: its RPC URL and its event endpoint,
/// which confirms subscriptions or, with `refuse`, turns them down.
async fn cometbft_with_events(refuse: bool) -> (Arc<FixtureChain>, String, String) {
    let chain = FixtureChain::at(5);
    let url = serve(chain.clone()).await;
    let ws = serve_events(chain.clone(), refuse).await;
    (chain, url, ws)
}

/// Waits until the agent logs that its head subscription is up.
async fn wait_subscribed(agent: &Agent, logs: &[&std::path::Path]) {
    wait_for("the subscription to be active", WAIT, logs, || {
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        async move { log.contains("head subscription active").then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn cometbft_new_block_events_wake_the_agent() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let (chain, url, ws) = cometbft_with_events(false).await;
    let agent = Agent::start(
        &world,
        "cosmos-ws",
        &url,
        &agg,
        AgentOptions {
            kind: "cometbft",
            poll_interval: "60s",
            block_time: "60s",
            extra_source: ws_source(&ws),
            ..Default::default()
        },
    );
    let q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    let at = |height: u64| {
        let q = q.clone();
        let want = format!("0x{}", chain.hash(height).to_lowercase());
        move || {
            let mut c = q.clone();
            let want = want.clone();
            async move {
                let h = node(&mut c, "cosmos-ws").await?.head?;
                (h.height == height && hex(&h.hash) == want).then_some(())
            }
        }
    };
    wait_for("cosmos-ws at 5", WAIT, &logs, at(5)).await;
    wait_subscribed(&agent, &logs).await;
    chain.tip.store(9, SeqCst);
    wait_for("cosmos-ws at 9 by event", WAIT, &logs, at(9)).await;
    let mut c = q.clone();
    assert!(findings(&mut c, "cosmos-ws", FindingKind::Linkage)
        .await
        .is_empty());
    assert!(findings(&mut c, "cosmos-ws", FindingKind::Unreachable)
        .await
        .iter()
        .all(|f| f.state() != FindingState::Open));
}

#[tokio::test]
async fn a_refused_subscription_is_logged_with_the_nodes_reason() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let (chain, url, ws) = cometbft_with_events(true).await;
    let agent = Agent::start(
        &world,
        "cosmos-refused",
        &url,
        &agg,
        AgentOptions {
            kind: "cometbft",
            extra_source: ws_source(&ws),
            ..Default::default()
        },
    );
    let log_path = agent.log.clone();
    wait_for(
        "the refusal in the log",
        WAIT,
        &[log_path.as_path()],
        || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            async move {
                (log.contains("the node refused the subscription")
                    && log.contains("max_subscriptions_per_client"))
                .then_some(())
            }
        },
    )
    .await;
    // Polling carries on regardless.
    chain.tip.store(8, SeqCst);
    let q = world.query(&agg).await;
    wait_for(
        "cosmos-refused at 8 by polling",
        WAIT,
        &[log_path.as_path()],
        || {
            let mut c = q.clone();
            async move { (node(&mut c, "cosmos-refused").await?.head?.height == 8).then_some(()) }
        },
    )
    .await;
}
