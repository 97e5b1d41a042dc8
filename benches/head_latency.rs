//! Head-to-aggregator latency for Ethereum, polling against subscription,
//! measured side by side in one run: one real anvil, one aggregator and two
//! agents (processes of the release binary) watching the same node, both
//! polling every `OUTPOST_BENCH_POLL` (default 1s, the shipped default), one
//! of them also subscribed to `newHeads` over anvil's WebSocket. The bench
//! mines one block at a time at random intervals (so blocks fall anywhere
//! in the poll cycle) and times, per agent, from the moment anvil returns
//! from `evm_mine` until the aggregator's query API shows the new height.
//! The query is asked every millisecond, so figures carry up to ~1 ms of
//! that wait.
//!
//! Run: `cargo bench --bench head_latency` (OUTPOST_BENCH_BLOCKS sets the
//! number of blocks, default 60; OUTPOST_IT_KEEP=1 keeps the configs and
//! logs). The processes are set up by the integration tests' harness. Needs
//! anvil (`npm install
//! @foundry-rs/anvil@1.7.1` in the repository root, or OUTPOST_ANVIL).

use std::time::{Duration, Instant};

use outpost::proto::GetNodeRequest;
use rand::Rng;
use serde_json::json;

#[path = "../tests/it/harness.rs"]
mod harness;

use harness::{wait_for, Agent, AgentOptions, Aggregator, Anvil, World};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let blocks: usize = std::env::var("OUTPOST_BENCH_BLOCKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let poll: &'static str = Box::leak(
        std::env::var("OUTPOST_BENCH_POLL")
            .unwrap_or_else(|_| "1s".into())
            .into_boxed_str(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let world = World::new();
        let anvil = Anvil::start(&world, "anvil").await;
        let agg = Aggregator::start(&world).await;
        let ws: &'static str =
            Box::leak(format!("ws_url = \"ws://127.0.0.1:{}\"", anvil.port).into_boxed_str());
        let agents = ["polling", "subscribed"];
        let procs: Vec<Agent> = agents
            .iter()
            .map(|id| {
                let extra_source = if *id == "subscribed" { ws } else { "" };
                Agent::start(
                    &world,
                    id,
                    &anvil.url(),
                    &agg,
                    AgentOptions {
                        poll_interval: poll,
                        block_time: "60s",
                        extra_source,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let q = world.query(&agg).await;
        let height = |id: &'static str| {
            let mut q = q.clone();
            async move {
                q.get_node(GetNodeRequest { node_id: id.into() })
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().summary)
                    .and_then(|n| n.head)
                    .map(|h| h.height)
            }
        };
        // Both agents report block 0, and the subscription is up.
        let logs = [
            procs[0].log.as_path(),
            procs[1].log.as_path(),
            agg.log.as_path(),
        ];
        wait_for(
            "both agents at block 0, subscribed",
            Duration::from_secs(60),
            &logs,
            || async {
                let log = std::fs::read_to_string(&procs[1].log).unwrap_or_default();
                (height(agents[0]).await == Some(0)
                    && height(agents[1]).await == Some(0)
                    && log.contains("head subscription active"))
                .then_some(())
            },
        )
        .await;

        let mut rng = rand::rng();
        let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for b in 1..=blocks as u64 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..1100))).await;
            anvil.rpc("evm_mine", json!([])).await;
            let mined = Instant::now();
            let mut seen = [false, false];
            while !(seen[0] && seen[1]) {
                for (i, id) in agents.iter().enumerate() {
                    if !seen[i] && height(id).await.is_some_and(|h| h >= b) {
                        seen[i] = true;
                        lat[i].push(mined.elapsed());
                    }
                }
                assert!(
                    mined.elapsed() < Duration::from_secs(30),
                    "block {b} never arrived"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        println!("blocks: {blocks}, poll_interval {poll} for both agents");
        println!(
            "{:<28} {:>9} {:>9} {:>9}",
            "head → aggregator", "p50 ms", "p99 ms", "max ms"
        );
        let mut p50 = [0.0; 2];
        for (i, label) in ["polling", "polling + newHeads"].iter().enumerate() {
            lat[i].sort();
            p50[i] = ms(percentile(&lat[i], 0.5));
            println!(
                "{label:<28} {:>9.1} {:>9.1} {:>9.1}",
                p50[i],
                ms(percentile(&lat[i], 0.99)),
                ms(*lat[i].last().unwrap())
            );
        }
        println!(
            "subscription p50 as a share of polling p50: {:.1}%",
            100.0 * p50[1] / p50[0]
        );
    });
}
