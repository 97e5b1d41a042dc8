//! Validation levels against real anvil, through a proxy that tampers with
//! or counts what anvil says.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost::proto::{FindingKind, FindingState, Severity};
use serde_json::Value;

use crate::harness::{rpc_proxy, Agent, AgentOptions, Aggregator, Anvil, World};
use crate::spine::{findings, wait_at_head, wait_finding};

const TAMPERED: u64 = 5;

fn is_block_reply(request: &Value, height: u64) -> bool {
    request["method"] == "eth_getBlockByNumber"
        && request["params"][0].as_str() == Some(&format!("0x{height:x}"))
}

#[tokio::test]
async fn level_full_flags_a_header_whose_contents_do_not_match_its_hash() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    // Rewrites one field of one block: the served hash stays anvil's.
    let proxy = rpc_proxy(anvil.url(), |request, reply| {
        if is_block_reply(request, TAMPERED) {
            reply["result"]["stateRoot"] = Value::String(format!("0x{}", "ab".repeat(32)));
        }
    })
    .await;
    let start = |id: &str, level: &'static str| {
        Agent::start(
            &world,
            id,
            &proxy,
            &agg,
            AgentOptions {
                extra_validate: level,
                ..Default::default()
            },
        )
    };
    let full = start("full", "level = \"full\"");
    let comprehensive = start("comprehensive", "level = \"comprehensive\"");
    let mut q = world.query(&agg).await;
    wait_at_head(&mut q, &anvil, &full, &agg).await;
    wait_at_head(&mut q, &anvil, &comprehensive, &agg).await;
    anvil.mine(10).await;

    let logs = [full.log.as_path(), agg.log.as_path()];
    let f = wait_finding(
        &q,
        "full",
        FindingKind::InvalidHeader,
        FindingState::Occurred,
        &logs,
    )
    .await;
    assert_eq!(f.height, TAMPERED);
    assert_eq!(f.severity(), Severity::Critical);
    assert!(
        f.summary
            .contains("served hash does not match its contents"),
        "{}",
        f.summary
    );
    assert!(
        f.summary.contains(&anvil.hash(TAMPERED).await),
        "{}",
        f.summary
    );

    // Every other block anvil made verifies; comprehensive cannot see a
    // changed state root.
    wait_at_head(&mut q, &anvil, &full, &agg).await;
    wait_at_head(&mut q, &anvil, &comprehensive, &agg).await;
    let all = findings(&mut q, "full", FindingKind::InvalidHeader).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let none = findings(&mut q, "comprehensive", FindingKind::InvalidHeader).await;
    assert!(none.is_empty(), "{none:?}");
}

#[tokio::test]
async fn level_comprehensive_flags_gas_beyond_the_limit_and_minimal_fetches_only_heads() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let overspent = rpc_proxy(anvil.url(), |request, reply| {
        if is_block_reply(request, TAMPERED) {
            reply["result"]["gasUsed"] = reply["result"]["gasLimit"].clone();
            let limit = reply["result"]["gasLimit"].as_str().unwrap().to_string();
            let limit = u64::from_str_radix(limit.trim_start_matches("0x"), 16).unwrap();
            reply["result"]["gasUsed"] = Value::String(format!("0x{:x}", limit + 1));
        }
    })
    .await;
    let fetched = Arc::new(AtomicU64::new(0));
    let counter = fetched.clone();
    let counted = rpc_proxy(anvil.url(), move |request, _| {
        if request["method"] == "eth_getBlockByNumber" {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
    let comprehensive = Agent::start(
        &world,
        "comprehensive",
        &overspent,
        &agg,
        AgentOptions {
            extra_validate: "level = \"comprehensive\"",
            ..Default::default()
        },
    );
    let minimal = Agent::start(
        &world,
        "minimal",
        &counted,
        &agg,
        AgentOptions {
            // Slow polls, so each one sees many new blocks.
            poll_interval: "1s",
            block_time: "1h",
            extra_validate: "level = \"minimal\"",
            ..Default::default()
        },
    );
    let mut q = world.query(&agg).await;
    wait_at_head(&mut q, &anvil, &comprehensive, &agg).await;
    wait_at_head(&mut q, &anvil, &minimal, &agg).await;
    let before = fetched.load(Ordering::Relaxed);
    let rounds = 5;
    for _ in 0..rounds {
        anvil.mine(20).await;
        wait_at_head(&mut q, &anvil, &minimal, &agg).await;
    }
    let per_round = (fetched.load(Ordering::Relaxed) - before) as f64 / rounds as f64;
    // Level standard would fetch all 20 new headers per round; minimal
    // fetches the head (twice: head, then header) once or twice per round.
    assert!(
        per_round <= 6.0,
        "minimal fetched {per_round} blocks per round of 20"
    );

    let logs = [comprehensive.log.as_path(), agg.log.as_path()];
    let f = wait_finding(
        &q,
        "comprehensive",
        FindingKind::InvalidHeader,
        FindingState::Occurred,
        &logs,
    )
    .await;
    assert_eq!(f.height, TAMPERED);
    assert_eq!(f.severity(), Severity::Warning);
    assert!(f.summary.contains("exceeds gasLimit"), "{}", f.summary);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let none = findings(&mut q, "minimal", FindingKind::InvalidHeader).await;
    assert!(none.is_empty(), "{none:?}");
}
