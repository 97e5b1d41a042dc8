//! Headers validated per second at each validation level, on one core.
//!
//! Each header goes through what the agent does with a block reply: parse
//! the JSON, turn it into a header (keeping the reply for the checks), check
//! that it links to its parent, then run the level's own checks. The
//! baseline is level `standard`, measured in the same run; `minimal` costs
//! the same per header, and saves by fetching only the head each poll.
//!
//! Run: `cargo bench --bench validate_levels` (OUTPOST_BENCH_HEADERS sets
//! the count per level).

use std::hint::black_box;
use std::time::{Duration, Instant};

use outpost::chain::ethereum::{parse_block, EthereumSource};
use outpost::chain::rpc::JsonRpcClient;
use outpost::config::ValidationLevel;
use outpost::latency::RpcTimings;
use outpost::node::judge::header_problems;

const BLOCK: &str = include_str!("../agent/chain/testdata/anvil-prague-block.json");

fn run(level: ValidationLevel, n: usize, source: &EthereumSource) -> f64 {
    let parent = parse_block(&serde_json::from_str(BLOCK).unwrap()).unwrap();
    let start = Instant::now();
    let mut problems = 0usize;
    for _ in 0..n {
        let v: serde_json::Value = serde_json::from_str(black_box(BLOCK)).unwrap();
        let h = parse_block(&v).unwrap();
        // Linkage, as level standard checks it (the same block stands in
        // for its own parent, so the check runs and fails the same way each time).
        let linked = h.height == parent.height + 1 && h.parent_hash == parent.hash;
        problems += usize::from(!linked);
        problems += header_problems(
            level,
            source,
            &h,
            Some(&parent),
            1_700_000_100,
            Duration::from_secs(15),
        )
        .len();
    }
    black_box(problems);
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let n: usize = std::env::var("OUTPOST_BENCH_HEADERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let source = EthereumSource::new(JsonRpcClient::new(
        "http://127.0.0.1:1",
        Duration::from_secs(1),
        1 << 20,
        RpcTimings::new(),
    ));
    const LEVELS: [ValidationLevel; 4] = [
        ValidationLevel::Minimal,
        ValidationLevel::Standard,
        ValidationLevel::Comprehensive,
        ValidationLevel::Full,
    ];
    // Warm up caches and the allocator, then five interleaved rounds; each
    // level's median round counts.
    run(ValidationLevel::Full, n / 10, &source);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); LEVELS.len()];
    for _ in 0..5 {
        for (i, level) in LEVELS.iter().enumerate() {
            rates[i].push(run(*level, n, &source));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<f64> = rates.iter_mut().map(median).collect();
    let baseline = medians[1];
    println!(
        "{n} headers per level and round, median of 5 rounds (anvil Prague block reply, {} bytes)",
        BLOCK.len()
    );
    println!("| level | headers/s | per header | vs standard |");
    println!("|---|---|---|---|");
    for (level, rate) in LEVELS.iter().zip(medians) {
        println!(
            "| {} | {:.0} | {:.2} µs | {:.2} |",
            level.label(),
            rate,
            1e6 / rate,
            rate / baseline
        );
    }
}
