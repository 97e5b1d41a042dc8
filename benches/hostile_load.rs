//! A healthy agent's acknowledgement latency while hostile peers press on
//! the same aggregator, against the same agent with no attack, in one run.
//!
//! One anvil mining every 100 ms, one aggregator and one healthy agent
//! (release binaries, started by the integration tests' harness). The agent
//! reports the round trip of its batches (sent to acknowledged) as a p99
//! per one-second status interval; the bench reads those for
//! `OUTPOST_BENCH_SECONDS` (default 20) quietly, then as long again while,
//! from this process:
//! - `OUTPOST_BENCH_IDLE` (default 4,000) idle TCP sockets sit on the
//!   aggregator's port (more than the limit of the run's config, 2,000);
//! - connections without a client certificate are opened and held;
//! - an agent key sends 500,000 empty events in one message, over and over;
//! - the same key sends 24 MiB messages;
//! - another agent key opens `OUTPOST_BENCH_STREAMS` (default 10,000)
//!   delivery streams, 16 to a connection, each sending its Hello and
//!   holding it open;
//! - an operator key opens 64 `Watch` streams on one connection.
//!
//! Run: `cargo bench --bench hostile_load`. Results go in BENCHMARKS.md.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outpost::proto::{
    agent_message, ingest_client::IngestClient, query_client::QueryClient, AgentMessage, Batch,
    Event, GetNodeRequest, Hello, WatchRequest,
};
use tokio_stream::StreamExt as _;

#[path = "../tests/it/harness.rs"]
mod harness;

use harness::{client_tls, Agent, AgentOptions, Aggregator, Anvil, Miner, World};

fn seconds() -> u64 {
    std::env::var("OUTPOST_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// The healthy agent's per-interval round-trip p99s (µs) over `secs`.
async fn sample(q: &QueryClient<tonic::transport::Channel>, secs: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut last = None;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(d) = q
            .clone()
            .get_node(GetNodeRequest {
                node_id: "healthy".into(),
            })
            .await
        else {
            continue;
        };
        let Some(rt) = d.into_inner().status.and_then(|s| s.round_trip) else {
            continue;
        };
        // One reading per status interval.
        if rt.count > 0 && last != Some((rt.count, rt.p99_us, rt.max_us)) {
            last = Some((rt.count, rt.p99_us, rt.max_us));
            out.push(rt.p99_us);
        }
    }
    out
}

fn summary(name: &str, p99s: &mut [u64]) -> f64 {
    p99s.sort();
    let median = p99s.get(p99s.len() / 2).copied().unwrap_or(0);
    let worst = p99s.last().copied().unwrap_or(0);
    println!(
        "{name:<10} intervals {:>3}  median p99 {:>8.2} ms  worst p99 {:>8.2} ms",
        p99s.len(),
        median as f64 / 1000.0,
        worst as f64 / 1000.0
    );
    worst as f64 / 1000.0
}

/// An agent's Hello on the devnet, as the attackers send it.
fn hello(node_id: &str, instance_id: String) -> AgentMessage {
    AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            node_id: node_id.into(),
            network: "devnet".into(),
            chain: "ethereum".into(),
            instance_id,
            ..Default::default()
        })),
    }
}

fn main() {
    let secs = seconds();
    let idle: usize = std::env::var("OUTPOST_BENCH_IDLE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        outpost::tls::install_crypto_provider();
        let world = World::new();
        let anvil = std::sync::Arc::new(Anvil::start(&world, "anvil").await);
        let agg = Aggregator::start_with(&world, "[limits]\nmax_connections = 2000\n").await;
        let healthy = Agent::start(
            &world,
            "healthy",
            &anvil.url(),
            &agg,
            AgentOptions {
                poll_interval: "50ms",
                block_time: "60s",
                ..Default::default()
            },
        );
        let q = world.query(&agg).await;
        let miner = Miner::start(anvil.clone(), Duration::from_millis(100));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss_quiet = agg.rss_bytes();
        let mut quiet = sample(&q, secs).await;

        // The attack.
        world.issue(&outpost::tls::Identity::Agent("bulk".into()));
        world.issue(&outpost::tls::Identity::Agent("many".into()));
        world.issue(&outpost::tls::Identity::Operator("watcher".into()));
        let pki = world.pki();
        let endpoint = format!("https://127.0.0.1:{}", agg.port);
        let endpoint_for = |stem: &str| {
            tonic::transport::Endpoint::from_shared(endpoint.clone())
                .unwrap()
                .tls_config(client_tls(&pki, stem))
                .unwrap()
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let running = |s: &std::sync::Arc<std::sync::atomic::AtomicBool>| {
            !s.load(std::sync::atomic::Ordering::SeqCst)
        };
        let mut tasks = Vec::new();
        // Idle sockets, past the connection limit.
        let port = agg.port;
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..idle {
                if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    held.push(s);
                }
            }
            tokio::time::sleep(Duration::from_secs(secs)).await;
            drop(held);
        }));
        // Floods of oversized messages from one agent key.
        for big in [false, true] {
            let (s, ep) = (stop.clone(), endpoint_for("agent-bulk"));
            tasks.push(tokio::spawn(async move {
                while running(&s) {
                    let Ok(ch) = ep.connect().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let body = if big {
                        Batch {
                            events: vec![Event {
                                seq: 1,
                                kind: Some(outpost::proto::event::Kind::Header(
                                    outpost::proto::Header {
                                        height: 1,
                                        hash: vec![7; 24 << 20],
                                        ..Default::default()
                                    },
                                )),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }
                    } else {
                        Batch {
                            events: vec![Event::default(); 500_000],
                            ..Default::default()
                        }
                    };
                    let hello = hello("bulk", format!("attacker-{big}"));
                    let batch = AgentMessage {
                        body: Some(agent_message::Body::Batch(body)),
                    };
                    if let Ok(r) = IngestClient::new(ch)
                        .max_encoding_message_size(usize::MAX)
                        .report(tokio_stream::iter(vec![hello, batch]))
                        .await
                    {
                        let mut inbound = r.into_inner();
                        while let Ok(Some(_)) = inbound.message().await {}
                    }
                }
            }));
        }
        // Many delivery streams from one agent key: one may stream, the
        // others are refused at the connection cap or as a second agent.
        let streams: usize = std::env::var("OUTPOST_BENCH_STREAMS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10_000);
        let outcomes = std::sync::Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
        {
            let (s, ep, outcomes) = (stop.clone(), endpoint_for("agent-many"), outcomes.clone());
            tasks.push(tokio::spawn(async move {
                let mut held = Vec::new();
                let mut opened = 0;
                while opened < streams && running(&s) {
                    let ch = match ep.connect().await {
                        Ok(ch) => ch,
                        Err(_) => {
                            *outcomes
                                .lock()
                                .unwrap()
                                .entry("connect failed".into())
                                .or_default() += 16;
                            opened += 16;
                            continue;
                        }
                    };
                    let mut on_connection = Vec::new();
                    for _ in 0..16.min(streams - opened) {
                        opened += 1;
                        let (tx, rx) = tokio::sync::mpsc::channel(1);
                        let hello = hello("many", format!("many-{opened}"));
                        tx.send(hello).await.unwrap();
                        let mut c = IngestClient::new(ch.clone());
                        let outcomes = outcomes.clone();
                        on_connection.push(tokio::spawn(async move {
                            // The request and the reply stream both held, so
                            // the stream stays open.
                            let (outcome, inbound) = match c
                                .report(tokio_stream::wrappers::ReceiverStream::new(rx))
                                .await
                            {
                                Err(st) => (format!("{:?}", st.code()), None),
                                Ok(r) => {
                                    let mut inbound = r.into_inner();
                                    match inbound.message().await {
                                        Ok(Some(_)) => ("welcomed".to_string(), Some(inbound)),
                                        Ok(None) => ("closed".into(), None),
                                        Err(st) => (format!("{:?}", st.code()), None),
                                    }
                                }
                            };
                            *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
                            (tx, inbound)
                        }));
                    }
                    for t in on_connection {
                        if let Ok(kept) = t.await {
                            held.push(kept);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(secs)).await;
                drop(held);
            }));
        }
        // Many streams on one operator connection.
        if let Ok(ch) = endpoint_for("operator-watcher").connect().await {
            for _ in 0..64 {
                let (s, mut c) = (stop.clone(), QueryClient::new(ch.clone()));
                tasks.push(tokio::spawn(async move {
                    if let Ok(r) = c.watch(WatchRequest::default()).await {
                        let mut w = r.into_inner();
                        while running(&s) {
                            if tokio::time::timeout(Duration::from_millis(200), w.next())
                                .await
                                .is_ok_and(|m| m.is_none())
                            {
                                break;
                            }
                        }
                    }
                }));
            }
        }
        let mut attacked = sample(&q, secs).await;
        let rss_attacked = agg.rss_bytes();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in tasks {
            t.abort();
        }
        miner.stop().await;
        println!(
            "aggregator limits.max_connections 2000, {idle} idle sockets, {secs} s each phase"
        );
        println!("healthy agent: batch → ack round trip, p99 per 1 s status interval");
        let quiet_worst = summary("quiet", &mut quiet);
        let attacked_worst = summary("attacked", &mut attacked);
        println!(
            "worst p99 under attack / quiet: {:.2}",
            attacked_worst / quiet_worst.max(0.001)
        );
        println!(
            "aggregator RSS: quiet {} MiB, under attack {} MiB",
            rss_quiet >> 20,
            rss_attacked >> 20
        );
        println!(
            "{streams} delivery streams from one agent key: {:?}",
            outcomes.lock().unwrap()
        );
        let metrics = agg.metrics().await;
        for l in metrics
            .lines()
            .filter(|l| l.starts_with("outpost_ingest_refused_total"))
        {
            println!("{l}");
        }
        drop(healthy);
    });
}
