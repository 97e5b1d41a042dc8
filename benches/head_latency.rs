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
//! number of blocks, default 60; OUTPOST_BENCH_KEEP=1 keeps the configs
//! and logs). Needs anvil (`npm install
//! @foundry-rs/anvil@1.7.1` in the repository root, or OUTPOST_ANVIL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost::cli::Connection;
use outpost::operator;
use outpost::proto::query_client::QueryClient;
use outpost::proto::GetNodeRequest;
use outpost::tls::{self, Identity, PkiLayout};
use rand::Rng;
use serde_json::{json, Value};
use tonic::transport::Channel;

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn anvil_bin() -> PathBuf {
    if let Ok(p) = std::env::var("OUTPOST_ANVIL") {
        return p.into();
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
    assert!(
        local.exists(),
        "anvil not found: run `npm install @foundry-rs/anvil@1.7.1` in the repository root, or set OUTPOST_ANVIL"
    );
    local
}

fn spawn(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    cmd.stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn agent_config(
    dir: &Path,
    pki: &PkiLayout,
    id: &str,
    anvil: u16,
    agg: u16,
    ws: bool,
    poll: &str,
) -> PathBuf {
    let path = dir.join(format!("{id}.toml"));
    let ws_line = if ws {
        format!("ws_url = \"ws://127.0.0.1:{anvil}\"")
    } else {
        String::new()
    };
    std::fs::write(
        &path,
        format!(
            r#"node_id = "{id}"
network = "devnet"
data_dir = "{data}"
[source]
kind = "ethereum"
url = "http://127.0.0.1:{anvil}"
{ws_line}
poll_interval = "{poll}"
[validate]
expected_block_time = "60s"
[host]
interval = "0s"
[report]
aggregator = "https://127.0.0.1:{agg}"
server_name = "localhost"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"#,
            data = dir.join(format!("{id}-data")).display(),
            ca = pki.ca_cert().display(),
            cert = pki.cert(&format!("agent-{id}")).display(),
            key = pki.key(&format!("agent-{id}")).display(),
        ),
    )
    .unwrap();
    path
}

async fn rpc(http: &reqwest::Client, port: u16, method: &str, params: Value) -> Value {
    http.post(format!("http://127.0.0.1:{port}"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("{method}: {e}"))
        .json::<Value>()
        .await
        .unwrap()["result"]
        .clone()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    tls::install_crypto_provider();
    let blocks: usize = std::env::var("OUTPOST_BENCH_BLOCKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let poll = std::env::var("OUTPOST_BENCH_POLL").unwrap_or_else(|_| "1s".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pki = PkiLayout::new(d.join("pki"));
        tls::init_pki(&pki.dir, &[], 1).unwrap();
        for id in [
            Identity::Agent("polling".into()),
            Identity::Agent("subscribed".into()),
            Identity::Operator("bench".into()),
        ] {
            tls::issue_client(&pki.dir, &id, 1).unwrap();
        }
        let (anvil, agg) = (free_port(), free_port());
        let bin = env!("CARGO_BIN_EXE_outpost");
        let mut procs = Procs(vec![spawn(
            Command::new(anvil_bin()).args([
                "--host",
                "127.0.0.1",
                "--port",
                &anvil.to_string(),
                "--no-mining",
                "--silent",
            ]),
            &d.join("anvil.log"),
        )]);
        let agg_cfg = d.join("aggregator.toml");
        std::fs::write(
            &agg_cfg,
            format!(
                "listen = \"127.0.0.1:{agg}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
                d.join("aggregator-data").display(),
                pki.ca_cert().display(),
                pki.cert("aggregator").display(),
                pki.key("aggregator").display(),
                free_port()
            ),
        )
        .unwrap();
        procs.0.push(spawn(
            Command::new(bin).args(["aggregator", "--config"]).arg(&agg_cfg),
            &d.join("aggregator.log"),
        ));
        let http = reqwest::Client::new();
        let conn = Connection {
            endpoint: format!("https://127.0.0.1:{agg}"),
            ca: pki.ca_cert(),
            cert: Some(pki.cert("operator-bench")),
            key: Some(pki.key("operator-bench")),
            server_name: Some("localhost".into()),
            json: false,
        };
        let mut q = None;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let up = http
                .post(format!("http://127.0.0.1:{anvil}"))
                .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}))
                .send()
                .await
                .is_ok();
            if up {
                if let Ok(c) = operator::connect(&conn).await {
                    q = Some(c);
                    break;
                }
            }
        }
        let mut q = q.expect("anvil and the aggregator start within 10 s");
        let agents = ["polling", "subscribed"];
        for (i, id) in agents.iter().enumerate() {
            let cfg = agent_config(d, &pki, id, anvil, agg, i == 1, &poll);
            procs.0.push(spawn(
                Command::new(bin).args(["agent", "--config"]).arg(cfg),
                &d.join(format!("{id}.log")),
            ));
        }
        let height = |q: &mut QueryClient<Channel>, id: &'static str| {
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
        let start = Instant::now();
        loop {
            let a = height(&mut q, agents[0]).await;
            let b = height(&mut q, agents[1]).await;
            let log = std::fs::read_to_string(d.join("subscribed.log")).unwrap_or_default();
            if a == Some(0) && b == Some(0) && log.contains("head subscription active") {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "agents did not report; logs in {}", d.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut rng = rand::rng();
        let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for b in 1..=blocks as u64 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..1100))).await;
            rpc(&http, anvil, "evm_mine", json!([])).await;
            let mined = Instant::now();
            let mut seen = [false, false];
            while !(seen[0] && seen[1]) {
                for (i, id) in agents.iter().enumerate() {
                    if !seen[i] && height(&mut q, id).await.is_some_and(|h| h >= b) {
                        seen[i] = true;
                        lat[i].push(mined.elapsed());
                    }
                }
                assert!(mined.elapsed() < Duration::from_secs(30), "block {b} never arrived");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        println!("blocks: {blocks}, poll_interval {poll} for both agents");
        println!("{:<28} {:>9} {:>9} {:>9}", "head → aggregator", "p50 ms", "p99 ms", "max ms");
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
        println!("subscription p50 as a share of polling p50: {:.1}%", 100.0 * p50[1] / p50[0]);
        drop(procs);
        if std::env::var_os("OUTPOST_BENCH_KEEP").is_some() {
            println!("kept {}", dir.keep().display());
        }
    });
}
