//! The fleet's once-a-second evaluation alone, without I/O: N nodes in 100
//! networks, each with a full compare window of agreeing hashes, judged as
//! the aggregator judges them every second (under the fleet's lock, so
//! ingest waits for it). Prints the time of one evaluation and per node.
//!
//! Run: `cargo bench --bench fleet_evaluate` (OUTPOST_EVAL_NODES=3000,6000,...
//! sets the fleet sizes).

use std::time::Instant;

use outpost::aggregator::judge::{FleetState, SeenAt};
use outpost::config::FleetConfig;
use outpost::proto::{self, event::Kind};

const NETWORKS: usize = 100;

fn header(net: usize, height: u64) -> proto::Event {
    let mut hash = vec![0u8; 32];
    hash[..8].copy_from_slice(&height.to_be_bytes());
    hash[8..16].copy_from_slice(&(net as u64).to_be_bytes());
    proto::Event {
        kind: Some(Kind::Header(proto::Header {
            height,
            hash,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("OUTPOST_EVAL_NODES")
        .unwrap_or_else(|_| "1000,3000,6000,12000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let cfg = FleetConfig::default();
    let window = cfg.compare_window;
    println!("| nodes | evaluation ms (median of 20) | µs per node |");
    println!("|---|---|---|");
    for n in sizes {
        let now = 1_700_000_000_000i64;
        let mut st = FleetState::new(now - 60_000);
        for i in 0..n {
            let net = i % NETWORKS;
            let events: Vec<proto::Event> = (1..=window).map(|h| header(net, h)).collect();
            st.on_batch(
                &format!("node-{i}"),
                &format!("net-{net}"),
                "ethereum",
                &events,
                now,
                window,
            );
        }
        let mut times = Vec::new();
        for k in 0..20 {
            let t = Instant::now();
            let ev = st.evaluate(now + k * 1000, &cfg, &SeenAt(now + k * 1000));
            times.push(t.elapsed());
            assert!(ev.emits.is_empty(), "a quiet fleet raised {:?}", ev.emits);
        }
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "| {n} | {:.2} | {:.2} |",
            median.as_secs_f64() * 1000.0,
            median.as_secs_f64() * 1e6 / n as f64
        );
    }
}
