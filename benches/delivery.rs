//! Delivery throughput on loopback, measured side by side in one run:
//!
//! - durable: events committed to the agent's sled outbox, streamed over one
//!   mutual-TLS gRPC stream by the real reporter, persisted and flushed by the
//!   real aggregator before it acknowledges, and deleted from the outbox;
//! - raw: the same batches over the same kind of mTLS stream to a server that
//!   acknowledges without storing anything;
//! - the two stores alone (agent outbox read, aggregator persist), to show
//!   where the durable path spends its time.
//!
//! Run: `cargo bench --bench delivery` (OUTPOST_BENCH_EVENTS sets the count,
//! OUTPOST_BENCH_RUNS how many times raw and durable each run, 5 by default).

use std::time::{Duration, Instant};

use outpost::aggregator::Aggregator;
use outpost::config::{
    AggregatorConfig, AggregatorStoreConfig, LogConfig, MetricsConfig, ReportConfig,
};
use outpost::model::{Hash, Header};
use outpost::node::report;
use outpost::proto::{
    self, agent_message, aggregator_message, event::Kind, ingest_client::IngestClient,
    ingest_server, AgentMessage, AggregatorMessage,
};
use outpost::store::central::CentralStore;
use outpost::store::local::{Commit, LocalStore};
use outpost::store::Durability;
use outpost::tls::{self, Identity, PkiLayout, TlsFiles};
use rand::RngCore;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const RECORD_EVENTS: usize = 250;
const BATCH_EVENTS: usize = 1000;

fn header_events(n: usize) -> Vec<Vec<Kind>> {
    let mut rng = rand::rng();
    let mut out = Vec::new();
    let mut parent = vec![0u8; 32];
    for chunk_start in (0..n).step_by(RECORD_EVENTS) {
        let mut rec = Vec::new();
        for height in chunk_start..(chunk_start + RECORD_EVENTS).min(n) {
            let mut hash = vec![0u8; 32];
            rng.fill_bytes(&mut hash);
            let h = Header {
                height: height as u64 + 1,
                hash: Hash(hash.clone()),
                parent_hash: Hash(parent.clone()),
                timestamp: 1_700_000_000 + height as i64 * 12,
                raw: None,
            };
            parent = hash;
            rec.push(Kind::Header(h.to_proto()));
        }
        out.push(rec);
    }
    out
}

fn fill_outbox(store: &LocalStore, records: &[Vec<Kind>]) -> Duration {
    let t = Instant::now();
    for rec in records {
        store
            .commit(
                Commit {
                    events: rec.clone(),
                    ..Default::default()
                },
                1,
            )
            .expect("commit");
    }
    t.elapsed()
}

fn tls_files(pki: &PkiLayout, stem: &str) -> TlsFiles {
    TlsFiles {
        ca: pki.ca_cert(),
        cert: pki.cert(stem),
        key: pki.key(stem),
        crl: None,
    }
}

/// A server that acknowledges every batch without storing it.
struct RawIngest;

#[tonic::async_trait]
impl ingest_server::Ingest for RawIngest {
    type ReportStream = ReceiverStream<Result<AggregatorMessage, Status>>;

    async fn report(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(agent_message::Body::Batch(b)) = m.body {
                    let upto = b.events.last().map_or(0, |e| e.seq);
                    let ack = AggregatorMessage {
                        body: Some(aggregator_message::Body::Ack(proto::Ack { upto_seq: upto })),
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn raw_stream(pki: &PkiLayout, batches: Vec<proto::Batch>) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls = tls_files(pki, "aggregator").server_config().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(server_tls)
            .unwrap()
            .add_service(
                ingest_server::IngestServer::new(RawIngest).max_decoding_message_size(64 << 20),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            tls_files(pki, "agent-bench")
                .client_config("localhost")
                .unwrap(),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = IngestClient::new(channel).max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<AgentMessage>(8);
    let total = batches.len();
    let started = Instant::now();
    let mut inbound = client
        .report(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        for b in batches {
            let m = AgentMessage {
                body: Some(agent_message::Body::Batch(b)),
            };
            if tx.send(m).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    });
    for _ in 0..total {
        inbound.message().await.unwrap().unwrap();
    }
    started.elapsed()
}

fn main() {
    tls::install_crypto_provider();
    let n: usize = std::env::var("OUTPOST_BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiLayout::new(dir.path().join("pki"));
        tls::init_pki(&pki.dir, &[], 1).unwrap();
        tls::issue_client(&pki.dir, &Identity::Agent("bench".into()), 1).unwrap();
        let records = header_events(n);
        let one = proto::Event { seq: 1, at_unix_ms: 1, kind: Some(records[0][0].clone()) };
        println!("events: {n} header events of {} bytes each (encoded), {RECORD_EVENTS} per outbox record, {BATCH_EVENTS} per stream message", prost::Message::encoded_len(&one));

        // Agent side: commit into the outbox.
        let store = LocalStore::open(&dir.path().join("agent"), 4 << 20, Durability::ProcessCrash, 1 << 40).unwrap();
        let fill = fill_outbox(&store, &records);
        store.flush().await.unwrap();
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        println!("agent outbox commit: {:>10.0} events/s", rate(fill));

        // Agent side: read the outbox as the reporter does.
        let t = Instant::now();
        let mut after = 0;
        let mut batches = Vec::new();
        loop {
            let recs = store.records_after(after, BATCH_EVENTS).unwrap();
            let events: Vec<proto::Event> = recs.into_iter().flat_map(|r| r.batch.events).collect();
            let Some(last) = events.last().map(|e| e.seq) else { break };
            after = last;
            batches.push(proto::Batch { events, pending: 0 });
        }
        let read = t.elapsed();
        println!("agent outbox read:   {:>10.0} events/s", rate(read));

        // Aggregator side alone: persist + group-commit flush per batch.
        let central = CentralStore::open(&dir.path().join("central-only"), 256 << 20, Durability::ProcessCrash).unwrap();
        let (mut in_persist, mut in_flush) = (Duration::ZERO, Duration::ZERO);
        for b in &batches {
            let t = Instant::now();
            central.persist("bench", b.events.clone(), 1, &mut None).await.unwrap();
            in_persist += t.elapsed();
            let t = Instant::now();
            central.durable().await.unwrap();
            in_flush += t.elapsed();
        }
        println!(
            "aggregator persist:  {:>10.0} events/s ({:.0} µs to persist and {:.0} µs to flush each {BATCH_EVENTS}-event batch)",
            rate(in_persist + in_flush),
            in_persist.as_micros() as f64 / batches.len() as f64,
            in_flush.as_micros() as f64 / batches.len() as f64,
        );

        // Raw against durable, OUTPOST_BENCH_RUNS times each (5 unless
        // set), interleaved so that both meet the same machine. The wall
        // rate of the raw stream swings by 2x between runs on two cores; the
        // CPU time per event (getrusage of this process, which runs both
        // ends) is steadier, so both are printed and the ratio is taken of
        // the medians.
        let runs: usize = std::env::var("OUTPOST_BENCH_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5)
            .max(1);
        let (mut raw_runs, mut durable_runs) = (Vec::new(), Vec::new());
        println!("| run | raw events/s | raw CPU µs/event | durable events/s | durable CPU µs/event | durable / raw |");
        println!("|---|---|---|---|---|---|");
        for i in 0..runs {
            let cpu = cpu_time();
            let raw = raw_stream(&pki, batches.clone()).await;
            let raw_cpu = cpu_time() - cpu;
            let (whole, durable_cpu) = durable(&dir.path().join(format!("whole-{i}")), &pki, &records, 4 << 20).await;
            let per_event = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
            println!(
                "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} % |",
                i + 1,
                rate(raw),
                per_event(raw_cpu),
                rate(whole),
                per_event(durable_cpu),
                100.0 * raw.as_secs_f64() / whole.as_secs_f64()
            );
            raw_runs.push((raw, raw_cpu));
            durable_runs.push((whole, durable_cpu));
        }
        let (raw, raw_cpu) = medians(&raw_runs);
        let (whole, durable_cpu) = medians(&durable_runs);
        println!("raw mTLS stream:     {:>10.0} events/s, {:.2} µs CPU per event (medians of {runs})", rate(raw), raw_cpu.as_secs_f64() * 1e6 / n as f64);
        println!("durable end to end:  {:>10.0} events/s, {:.2} µs CPU per event ({BATCH_EVENTS}-event messages)", rate(whole), durable_cpu.as_secs_f64() * 1e6 / n as f64);
        println!(
            "durable / raw:       {:>10.1} % of the rate, {:.1} % of the CPU per event",
            100.0 * raw.as_secs_f64() / whole.as_secs_f64(),
            100.0 * durable_cpu.as_secs_f64() / raw_cpu.as_secs_f64()
        );
        let bounds: Vec<usize> = std::env::var("OUTPOST_BENCH_BATCH_BYTES")
            .unwrap_or_else(|_| format!("8192,32768,{}", outpost::config::DEFAULT_BATCH_MAX_BYTES))
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        for bytes in bounds {
            let (took, _) = durable(&dir.path().join(format!("bounded-{bytes}")), &pki, &records, bytes).await;
            println!(
                "durable end to end:  {:>10.0} events/s (messages of at most {bytes} bytes), {:.1} % of the {BATCH_EVENTS}-event rate",
                rate(took),
                100.0 * whole.as_secs_f64() / took.as_secs_f64()
            );
        }
    });
}

/// CPU time of this process so far, user and system, all threads.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given and reads nothing else.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The median wall time and the median CPU time of `runs`, each taken on
/// its own.
fn medians(runs: &[(Duration, Duration)]) -> (Duration, Duration) {
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    (
        median(runs.iter().map(|r| r.0).collect()),
        median(runs.iter().map(|r| r.1).collect()),
    )
}

/// Commits `records` into a fresh outbox in `dir` and times their delivery
/// by the real reporter to a fresh aggregator, with batches of at most
/// `batch_bytes`: the wall time and this process's CPU time, from the
/// reporter's start until the outbox is empty.
async fn durable(
    dir: &std::path::Path,
    pki: &PkiLayout,
    records: &[Vec<Kind>],
    batch_bytes: usize,
) -> (Duration, Duration) {
    let store = LocalStore::open(
        &dir.join("agent"),
        4 << 20,
        Durability::ProcessCrash,
        1 << 40,
    )
    .unwrap();
    fill_outbox(&store, records);
    store.flush().await.unwrap();
    let agg = Aggregator::bind(AggregatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("aggregator"),
        tls: tls_files(pki, "aggregator"),
        store: AggregatorStoreConfig {
            cache_bytes: 256 << 20,
            ..Default::default()
        },
        fleet: Default::default(),
        metrics: MetricsConfig {
            enabled: false,
            ..Default::default()
        },
        alerts: Vec::new(),
        limits: Default::default(),
        snapshot: Default::default(),
        log: LogConfig::default(),
    })
    .await
    .unwrap();
    let endpoint = format!("https://{}", agg.local_addr().unwrap());
    tokio::spawn(agg.serve(std::future::pending()));
    let cfg = ReportConfig {
        aggregator: outpost::config::Aggregators(vec![endpoint]),
        server_name: Some("localhost".into()),
        ca: pki.ca_cert(),
        cert: pki.cert("agent-bench"),
        key: pki.key("agent-bench"),
        batch_max_events: BATCH_EVENTS,
        batch_max_bytes: batch_bytes,
        heartbeat_interval: Duration::from_secs(10),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
    };
    let me = report::Identity {
        node_id: "bench".into(),
        network: "bench".into(),
        chain: "ethereum".into(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let cpu = cpu_time();
    let t = Instant::now();
    let reporter = tokio::spawn(report::run(
        cfg,
        me,
        store.clone(),
        stop_rx,
        outpost::latency::Latency::new(),
    ));
    while store.outbox_bytes() > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = (t.elapsed(), cpu_time() - cpu);
    stop_tx.send_replace(true);
    let _ = reporter.await;
    took
}
