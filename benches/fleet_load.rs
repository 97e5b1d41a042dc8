//! Fleet load: N simulated agents against one real aggregator process on
//! loopback. Each agent has its own certificate and TLS connection and sends
//! one report a second by default (a status event, and a header every
//! fourth report).
//! "Ingest to queryable" is the time from sending a report to receiving its
//! acknowledgement: the aggregator acknowledges only after the events are
//! persisted and flushed, at which point queries return them.
//!
//! Each agent's first report carries its last 256 headers (an agent
//! reconnecting with a backlog does the same), so the aggregator holds a
//! full compare window (`fleet.compare_window`, 256 by default) per node,
//! as it does once a fleet has run for a while.
//!
//! Run: `cargo bench --bench fleet_load` (OUTPOST_LOAD_STEPS=1000,5000,...
//! sets the agent counts; OUTPOST_LOAD_SECONDS the measuring time per step;
//! OUTPOST_LOAD_BATCH_BYTES the agents' batch bound, 0 for one message per
//! report; OUTPOST_LOAD_BASELINE another outpost binary to run the same
//! steps against first; OUTPOST_LOAD_PROCS the number of load processes the
//! agents are spread over, 1 by default; OUTPOST_LOAD_REPORT_MS the time
//! between one agent's reports, 1000 by default). Per agent: the aggregator's RSS
//! above its idle RSS, over the agents; per report: its CPU time over the
//! reports acknowledged; per evaluation: the mean time of the fleet's
//! once-a-second evaluation in the measuring time, from the aggregator's
//! `outpost_fleet_evaluation_duration_seconds`.
//!
//! The aggregator's config lifts `limits.max_connections` from its default
//! 16,384 to 19,500, just under this machine's 20,000 open files a process,
//! so that the largest steps find the aggregator's own limit.
//!
//! The simulated agents run in child processes of this bench (the same
//! binary, started with OUTPOST_LOAD_CHILD), so that a fleet larger than one
//! process's open-file limit can be spread over several. The parent tells
//! them on stdin how many agents to add and when to measure; they answer on
//! stdout with their counts and their latency histogram.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use outpost::proto::{
    agent_message, aggregator_message, event::Kind, ingest_client::IngestClient, AgentMessage,
    AggregatorMessage, Batch, Event, Header, Hello, LatencySummary, NodeStatus,
};
use outpost::tls::{self, PkiLayout};
use rand::Rng;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const NETWORKS: usize = 100;
const BLOCK_SECS: u64 = 4;

struct Shared {
    hist: Mutex<Histogram<u64>>,
    measuring: AtomicBool,
    reports: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    /// Unix ms at which every load process's chains started, so that the
    /// nodes of a network agree on their heights whichever process runs them.
    epoch_ms: u64,
    /// Encoded bytes per batch (`report.batch_max_bytes`); 0: each report
    /// in one message, however large.
    batch_bytes: usize,
    /// Time between one agent's reports.
    every: Duration,
}

fn hash(net: usize, height: u64) -> Vec<u8> {
    let mut h = vec![0u8; 32];
    h[..8].copy_from_slice(&height.to_be_bytes());
    h[8..16].copy_from_slice(&(net as u64).to_be_bytes());
    h
}

fn issue(issuer: &Issuer<'_, KeyPair>, node: &str) -> Identity {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        format!("outpost://agent/{node}")
            .as_str()
            .try_into()
            .unwrap(),
    )];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    Identity::from_pem(cert.pem(), key.serialize_pem())
}

async fn agent(
    i: usize,
    url: String,
    tls: ClientTlsConfig,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
) {
    let node = format!("load-{i}");
    let net = i % NETWORKS;
    let connect = async {
        let _permit = gate.acquire().await.ok()?;
        let channel = Endpoint::from_shared(url)
            .ok()?
            .tls_config(tls)
            .ok()?
            .connect_timeout(Duration::from_secs(30))
            .connect()
            .await
            .ok()?;
        let (tx, rx) = mpsc::channel::<AgentMessage>(2);
        let hello = Hello {
            node_id: node.clone(),
            network: format!("net-{net}"),
            chain: "ethereum".into(),
            agent_version: "load".into(),
            local_last_seq: 0,
            instance_id: format!("load-{node}"),
        };
        tx.send(AgentMessage {
            body: Some(agent_message::Body::Hello(hello)),
        })
        .await
        .ok()?;
        let mut inbound = IngestClient::new(channel)
            .report(ReceiverStream::new(rx))
            .await
            .ok()?
            .into_inner();
        let welcome = inbound.message().await.ok()??;
        Some((tx, inbound, welcome))
    };
    let Some((tx, mut inbound, _)) = connect.await else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut seq = 0u64;
    let phase = Duration::from_millis(rand::rng().random_range(0..shared.every.as_millis() as u64));
    tokio::time::sleep(phase).await;
    let mut tick = tokio::time::interval(shared.every);
    let mut report = 0u64;
    // The first report's headers: a full compare window at its default.
    let backlog = outpost::config::FleetConfig::default().compare_window;
    loop {
        tick.tick().await;
        report += 1;
        let now_ms = outpost::model::now_unix_ms();
        let height = (now_ms as u64).saturating_sub(shared.epoch_ms) / 1000 / BLOCK_SECS + backlog;
        let mut events = Vec::with_capacity(2);
        let first = if report == 1 {
            height + 1 - backlog
        } else if report % 4 == 0 {
            height
        } else {
            height + 1
        };
        for h in first..=height {
            seq += 1;
            events.push(Event {
                seq,
                at_unix_ms: now_ms,
                kind: Some(Kind::Header(Header {
                    height: h,
                    hash: hash(net, h),
                    parent_hash: hash(net, h - 1),
                    timestamp: now_ms / 1000,
                })),
            });
        }
        seq += 1;
        events.push(Event {
            seq,
            at_unix_ms: now_ms,
            kind: Some(Kind::Status(NodeStatus {
                head_height: height,
                head_hash: hash(net, height),
                reachable: true,
                peers: Some(25),
                syncing: Some(false),
                rpc_latency: Some(LatencySummary {
                    count: 3,
                    p50_us: 900,
                    p90_us: 1500,
                    p99_us: 2500,
                    max_us: 3000,
                }),
                ..Default::default()
            })),
        });
        let sent = Instant::now();
        // In batches of at most `batch_bytes`, as an agent sends its outbox.
        let mut rest = &events[..];
        while !rest.is_empty() {
            let n = match shared.batch_bytes {
                0 => rest.len(),
                max => outpost::wire::fitting(rest, max),
            };
            let batch = Batch {
                events: rest[..n].to_vec(),
                pending: 0,
            };
            rest = &rest[n..];
            if tx
                .send(AgentMessage {
                    body: Some(agent_message::Body::Batch(batch)),
                })
                .await
                .is_err()
            {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        loop {
            match inbound.message().await {
                Ok(Some(AggregatorMessage {
                    body: Some(aggregator_message::Body::Ack(ack)),
                })) if ack.upto_seq >= seq => break,
                Ok(Some(_)) => {}
                _ => {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    shared.connected.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        if shared.measuring.load(Ordering::Relaxed) {
            let us = sent.elapsed().as_micros() as u64;
            let _ = shared.hist.lock().unwrap().record(us.max(1));
            shared.reports.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn proc_stat(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    (rss_kb, ticks)
}

/// The sum (seconds) and count of the aggregator's fleet evaluations so
/// far, from its /metrics.
fn evaluations(port: u16) -> (f64, f64) {
    let mut text = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let _ = std::io::Read::read_to_string(&mut s, &mut text);
    }
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("outpost_fleet_evaluation_duration_seconds_sum"),
        value("outpost_fleet_evaluation_duration_seconds_count"),
    )
}

struct Aggregator(Child);

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    tls::install_crypto_provider();
    if let Ok(pki) = std::env::var("OUTPOST_LOAD_CHILD") {
        return child(PkiLayout::new(std::path::PathBuf::from(pki)));
    }
    let steps: Vec<usize> = std::env::var("OUTPOST_LOAD_STEPS")
        .unwrap_or_else(|_| "1000,5000,10000,15000,19000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let seconds: u64 = env_or("OUTPOST_LOAD_SECONDS", 15);
    let procs: usize = env_or("OUTPOST_LOAD_PROCS", 1usize).max(1);
    // OUTPOST_LOAD_BASELINE names another build of outpost (an earlier
    // commit's): the same steps run against it first, in the same run.
    if let Ok(baseline) = std::env::var("OUTPOST_LOAD_BASELINE") {
        println!("\nbaseline: {baseline}");
        run(std::path::Path::new(&baseline), &steps, seconds, procs);
        println!("\nthis build:");
    }
    run(
        std::path::Path::new(env!("CARGO_BIN_EXE_outpost")),
        &steps,
        seconds,
        procs,
    );
}

/// A load process: runs the agents the parent adds, and measures when told.
///
/// Commands, one a line on stdin: `add FROM TO` starts agents FROM..TO and
/// answers `settled CONNECTED FAILED` once each has connected or failed;
/// `measure SECONDS` answers `result REPORTS VALUE:COUNT,...` with the
/// acknowledgement latencies (µs) recorded in that time.
fn child(pki: PkiLayout) {
    let url = std::env::var("OUTPOST_LOAD_URL").expect("OUTPOST_LOAD_URL");
    let ca_pem = std::fs::read_to_string(pki.ca_cert()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &ca_pem,
        KeyPair::from_pem(&std::fs::read_to_string(pki.ca_key()).unwrap()).unwrap(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared {
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        measuring: AtomicBool::new(false),
        reports: AtomicU64::new(0),
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        epoch_ms: env_or("OUTPOST_LOAD_EPOCH_MS", 0),
        batch_bytes: env_or(
            "OUTPOST_LOAD_BATCH_BYTES",
            outpost::config::DEFAULT_BATCH_MAX_BYTES,
        ),
        every: Duration::from_millis(env_or("OUTPOST_LOAD_REPORT_MS", 1000u64).max(1)),
    });
    let gate = Arc::new(Semaphore::new(32));
    let mut started = 0u64;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["add", from, to] => {
                let (from, to): (usize, usize) = (from.parse().unwrap(), to.parse().unwrap());
                for i in from..to {
                    let tls = ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&ca_pem))
                        .identity(issue(&issuer, &format!("load-{i}")))
                        .domain_name("localhost");
                    rt.spawn(agent(i, url.clone(), tls, shared.clone(), gate.clone()));
                }
                started += (to - from) as u64;
                let t = Instant::now();
                while shared.connected.load(Ordering::Relaxed)
                    + shared.failed.load(Ordering::Relaxed)
                    < started
                    && t.elapsed() < Duration::from_secs(300)
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                writeln!(
                    out,
                    "settled {} {}",
                    shared.connected.load(Ordering::Relaxed),
                    shared.failed.load(Ordering::Relaxed)
                )
                .unwrap();
            }
            ["measure", seconds] => {
                shared.hist.lock().unwrap().reset();
                shared.reports.store(0, Ordering::Relaxed);
                shared.measuring.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(seconds.parse().unwrap()));
                shared.measuring.store(false, Ordering::Relaxed);
                let h = shared.hist.lock().unwrap().clone();
                let values: Vec<String> = h
                    .iter_recorded()
                    .map(|v| format!("{}:{}", v.value_iterated_to(), v.count_at_value()))
                    .collect();
                writeln!(
                    out,
                    "result {} {}",
                    shared.reports.load(Ordering::Relaxed),
                    values.join(",")
                )
                .unwrap();
            }
            _ => panic!("load process: unknown command {line:?}"),
        }
        out.flush().unwrap();
    }
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// One load process, seen from the parent.
struct LoadProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LoadProcess {
    fn start(pki: &PkiLayout, url: &str, epoch_ms: u64) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("OUTPOST_LOAD_CHILD", &pki.dir)
            .env("OUTPOST_LOAD_URL", url)
            .env("OUTPOST_LOAD_EPOCH_MS", epoch_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("load process starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        LoadProcess {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("load process reads its commands");
    }

    /// The words of the next line the load process answers, after `tag`.
    fn answer(&mut self, tag: &str) -> Vec<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let mut words = line.split_whitespace().map(str::to_string);
        assert_eq!(
            words.next().as_deref(),
            Some(tag),
            "load process answered {line:?}"
        );
        words.collect()
    }
}

impl Drop for LoadProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The steps against one aggregator process of `binary`, with a fresh
/// store and fresh agents spread over `procs` load processes.
fn run(binary: &std::path::Path, steps: &[usize], seconds: u64, procs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let pki = PkiLayout::new(dir.path().join("pki"));
    tls::init_pki(&pki.dir, &[], 1).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[fleet]\nsilent_after = \"60s\"\nmax_networks = 128\n[limits]\nmax_connections = 19500\n[log]\nlevel = \"warn\"\n",
            dir.path().join("data").display(),
            pki.ca_cert().display(),
            pki.cert("aggregator").display(),
            pki.key("aggregator").display()
        ),
    )
    .unwrap();
    let agg = Aggregator(
        Command::new(binary)
            .args(["aggregator", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("aggregator.log")).unwrap())
            .spawn()
            .expect("aggregator starts"),
    );
    let pid = agg.0.id();
    std::thread::sleep(Duration::from_secs(1));
    let (idle_rss_kb, _) = proc_stat(pid);

    let url = format!("https://127.0.0.1:{port}");
    let epoch_ms = outpost::model::now_unix_ms() as u64;
    let mut load: Vec<LoadProcess> = (0..procs)
        .map(|_| LoadProcess::start(&pki, &url, epoch_ms))
        .collect();
    let batch_bytes: usize = env_or(
        "OUTPOST_LOAD_BATCH_BYTES",
        outpost::config::DEFAULT_BATCH_MAX_BYTES,
    );
    println!(
        "aggregator pid {pid}, {} MiB idle; {NETWORKS} networks; {procs} load process(es); a report every {} ms per agent, a header every 4th; batches of at most {} bytes",
        idle_rss_kb / 1024,
        env_or("OUTPOST_LOAD_REPORT_MS", 1000u64),
        match batch_bytes {
            0 => "unbounded".to_string(),
            b => b.to_string(),
        }
    );
    println!("| agents | connected | reports/s | p50 ms | p99 ms | max ms | aggregator RSS MiB | aggregator CPU % | KiB per agent | CPU µs per report | load CPU % | evaluation ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut started = 0;
    for &n in steps {
        // The new agents, in one contiguous range per load process.
        let per = (n - started).div_ceil(procs);
        for (k, p) in load.iter_mut().enumerate() {
            let from = (started + k * per).min(n);
            p.send(&format!("add {from} {}", (from + per).min(n)));
        }
        let (mut connected, mut failed) = (0u64, 0u64);
        for p in &mut load {
            let a = p.answer("settled");
            connected += a[0].parse::<u64>().unwrap();
            failed += a[1].parse::<u64>().unwrap();
        }
        started = n;
        std::thread::sleep(Duration::from_secs(5));
        let cpu =
            |load: &[LoadProcess]| -> u64 { load.iter().map(|p| proc_stat(p.child.id()).1).sum() };
        let (_, cpu0) = proc_stat(pid);
        let load0 = cpu(&load);
        let eval0 = evaluations(metrics_port);
        for p in &mut load {
            p.send(&format!("measure {seconds}"));
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut reports = 0u64;
        for p in &mut load {
            let a = p.answer("result");
            reports += a[0].parse::<u64>().unwrap();
            for pair in a.get(1).map(|v| v.split(',')).into_iter().flatten() {
                let (value, count) = pair.split_once(':').unwrap();
                h.record_n(value.parse().unwrap(), count.parse().unwrap())
                    .unwrap();
            }
        }
        let (rss_kb, cpu1) = proc_stat(pid);
        let load1 = cpu(&load);
        let eval1 = evaluations(metrics_port);
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let clk = 100.0;
        let cpu_s = (cpu1 - cpu0) as f64 / clk;
        println!(
            "| {n} | {connected} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} |",
            reports as f64 / seconds as f64,
            ms(0.5),
            ms(0.99),
            h.max() as f64 / 1000.0,
            rss_kb as f64 / 1024.0,
            cpu_s / seconds as f64 * 100.0,
            rss_kb.saturating_sub(idle_rss_kb) as f64 / n as f64,
            cpu_s * 1e6 / reports.max(1) as f64,
            (load1 - load0) as f64 / clk / seconds as f64 * 100.0,
            (eval1.0 - eval0.0) * 1000.0 / (eval1.1 - eval0.1).max(1.0),
        );
        if failed > 0 {
            println!("({failed} agents failed to connect or lost their stream)");
        }
    }
    drop(load);
    drop(agg);
}
