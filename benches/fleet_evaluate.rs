//! The fleet's once-a-second evaluation: N nodes in 100 networks, each with
//! a full compare window of agreeing hashes, judged as the aggregator judges
//! them every second (under the fleet's lock, so ingest waits for it).
//! Prints the time of one evaluation and per node: the rules alone
//! (`FleetState::evaluate`), and the aggregator's whole evaluation
//! (`Fleet::evaluate`: the rules, then the gauges of every node written for
//! /metrics), on a fleet fed the same batches through `Fleet::on_batch`.
//!
//! Run: `cargo bench --bench fleet_evaluate` (OUTPOST_EVAL_NODES=3000,6000,...
//! sets the fleet sizes).

use std::sync::Arc;
use std::time::Instant;

use outpost::aggregator::alert::Alerts;
use outpost::aggregator::fleet::Fleet;
use outpost::aggregator::judge::{FleetState, SeenAt};
use outpost::aggregator::metrics::Metrics;
use outpost::config::FleetConfig;
use outpost::proto::{self, event::Kind};
use outpost::store::central::CentralStore;

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
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _inside = rt.enter();
    println!("| nodes | rules, ms (median of 20) | µs per node | whole evaluation, ms | µs per node | whole / rules |");
    println!("|---|---|---|---|---|---|");
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
        let rules = times[times.len() / 2];
        let whole = whole_evaluation(n, &cfg);
        println!(
            "| {n} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            rules.as_secs_f64() * 1000.0,
            rules.as_secs_f64() * 1e6 / n as f64,
            whole.as_secs_f64() * 1000.0,
            whole.as_secs_f64() * 1e6 / n as f64,
            whole.as_secs_f64() / rules.as_secs_f64()
        );
    }
}

/// The median of 20 of the aggregator's evaluations of `n` nodes.
fn whole_evaluation(n: usize, cfg: &FleetConfig) -> std::time::Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = CentralStore::open(dir.path(), 64 << 20, Default::default()).expect("store");
    let fleet = Fleet::load(
        store,
        cfg.clone(),
        Arc::default(),
        Alerts::start(&[]),
        Arc::new(Metrics::default()),
    )
    .expect("fleet");
    for i in 0..n {
        let net = i % NETWORKS;
        let events: Vec<proto::Event> = (1..=cfg.compare_window).map(|h| header(net, h)).collect();
        fleet.on_batch(
            &format!("node-{i}"),
            &format!("net-{net}"),
            "ethereum",
            &events,
            0,
        );
    }
    let now = outpost::model::now_unix_ms();
    let mut times: Vec<_> = (0..20)
        .map(|k| {
            let t = Instant::now();
            fleet.evaluate(now + k * 1000);
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
