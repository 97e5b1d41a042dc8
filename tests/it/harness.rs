//! Real parts for integration tests: anvil nodes, the outpost binary as
//! aggregator and agents (each a process on a free loopback port in a temp
//! dir), and certificates made per test. A missing part fails the test with
//! a message that says how to install it.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost::cli::Connection;
use outpost::proto::query_client::QueryClient;
use outpost::tls::{self, Identity, PkiLayout};
use serde_json::{json, Value};
use tonic::transport::Channel;

/// The binary under test: this build's, or `OUTPOST_BIN` (an installed
/// package, an older build to compare with).
pub fn outpost_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("OUTPOST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_outpost").into())
    })
}

/// anvil from `OUTPOST_ANVIL`, the repo's node_modules, or PATH.
pub fn anvil_bin() -> PathBuf {
    if let Ok(p) = std::env::var("OUTPOST_ANVIL") {
        return PathBuf::from(p);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
    if local.exists() {
        return local;
    }
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg("command -v anvil")
        .output()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "anvil not found: these tests need a real Ethereum node. Install it with \
         `npm install @foundry-rs/anvil@1.7.1` in the repository root (or run ./.ci/run), \
         or point OUTPOST_ANVIL at the binary"
    );
}

/// A loopback port nothing listens on, for a process the test starts. It
/// is picked below the kernel's ephemeral range (32768 and up), so that no
/// outgoing connection takes it between this pick and the process's bind,
/// and from one counter per test process, so that no two picks repeat.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 10_000;
    const LAST: u16 = 32_000;
    static NEXT: std::sync::OnceLock<AtomicU16> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU16::new(rand::random_range(FIRST..LAST)));
    for _ in FIRST..LAST {
        let p = next.fetch_add(1, Ordering::Relaxed);
        if !(FIRST..LAST).contains(&p) {
            next.store(FIRST, Ordering::Relaxed);
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port in {FIRST}..{LAST}")
}

/// Polls `check` until it returns Some, or fails with `what` and the logs.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, logs: &[&Path], mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            let mut msg = format!("timed out after {timeout:?} waiting for {what}\n");
            for log in logs {
                let text = fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                msg.push_str(&format!("--- last lines of {}:\n", log.display()));
                for l in tail.into_iter().rev() {
                    msg.push_str(l);
                    msg.push('\n');
                }
            }
            panic!("{msg}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("log fd"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// How long the certificates of a test's PKI are valid.
const CERT_DAYS: i64 = 30;

/// One test's world: a temp dir with a PKI.
pub struct World {
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::Builder::new()
            .prefix("outpost-it-")
            .tempdir()
            .expect("temp dir");
        let mut dir = dir;
        // OUTPOST_IT_KEEP=1 keeps each test's dir (logs, stores) for a look afterwards.
        if std::env::var_os("OUTPOST_IT_KEEP").is_some() {
            dir.disable_cleanup(true);
        }
        // Past the seven days inside which the aggregator raises
        // cert-expiry, so that a quiet fleet is quiet.
        tls::init_pki(&dir.path().join("pki"), &[], CERT_DAYS).expect("CA");
        World { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pki(&self) -> PkiLayout {
        PkiLayout::new(self.path().join("pki"))
    }

    /// Issues a two-day certificate for `id`, unless a test issued one first.
    pub fn issue(&self, id: &Identity) {
        if !self.pki().cert(&tls::stem(id)).exists() {
            tls::issue_client(&self.pki().dir, id, CERT_DAYS).expect("issue cert");
        }
    }

    /// Operator connection settings with a fresh operator cert.
    pub fn operator(&self, agg: &Aggregator) -> Connection {
        let pki = self.pki();
        if !pki.cert("operator-tester").exists() {
            self.issue(&Identity::Operator("tester".into()));
        }
        Connection {
            endpoint: vec![format!("https://127.0.0.1:{}", agg.port)],
            ca: pki.ca_cert(),
            cert: Some(pki.cert("operator-tester")),
            key: Some(pki.key("operator-tester")),
            server_name: Some("localhost".into()),
            json: false,
        }
    }

    pub async fn query(&self, agg: &Aggregator) -> QueryClient<Channel> {
        outpost::operator::connect(&self.operator(agg))
            .await
            .expect("operator connects")
    }
}

/// Client TLS with the certificate `stem` of `pki`, for the aggregator's
/// name in the tests' certificates.
pub fn client_tls(pki: &PkiLayout, stem: &str) -> tonic::transport::ClientTlsConfig {
    tls::TlsFiles {
        ca: pki.ca_cert(),
        cert: pki.cert(stem),
        key: pki.key(stem),
        crl: None,
    }
    .client_config("localhost")
    .unwrap()
}

/// A channel to `agg` with the certificate of agent `node` (issued unless
/// it was), for tests that speak the ingest protocol themselves.
pub async fn agent_channel(world: &World, agg: &Aggregator, node: &str) -> Channel {
    world.issue(&Identity::Agent(node.into()));
    tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", agg.port))
        .unwrap()
        .tls_config(client_tls(&world.pki(), &format!("agent-{node}")))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub struct Anvil {
    pub port: u16,
    child: Option<Child>,
    pub log: PathBuf,
    http: reqwest::Client,
    /// Where the test reaches it.
    host: String,
    /// A network namespace it runs in, with how it mines there.
    netns: Option<(String, &'static str)>,
}

impl Anvil {
    pub async fn start(world: &World, name: &str) -> Anvil {
        let mut a = Anvil {
            port: free_port(),
            child: None,
            log: world.path().join(format!("{name}.log")),
            http: reqwest::Client::new(),
            host: "127.0.0.1".into(),
            netns: None,
        };
        a.restart().await;
        a
    }

    /// An anvil inside network namespace `netns`, reached from the test at
    /// `host`, mining a block every `block_time` seconds on its own.
    pub async fn start_in(
        world: &World,
        name: &str,
        netns: &str,
        host: &str,
        block_time: &'static str,
    ) -> Anvil {
        let mut a = Anvil {
            port: free_port(),
            child: None,
            log: world.path().join(format!("{name}.log")),
            http: reqwest::Client::new(),
            host: host.into(),
            netns: Some((netns.into(), block_time)),
        };
        a.restart().await;
        a
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Starts (again) on the same port: a fresh chain with the same genesis.
    pub async fn restart(&mut self) {
        let bin = anvil_bin();
        let port = self.port.to_string();
        let mut args = vec!["--port", &port, "--silent"];
        args.extend(["--timestamp", "1700000000", "--chain-id", "31337"]);
        let mut cmd = match &self.netns {
            None => {
                args.extend(["--host", "127.0.0.1", "--no-mining"]);
                Command::new(&bin)
            }
            Some((ns, block_time)) => {
                args.extend(["--host", "0.0.0.0", "--block-time", block_time]);
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
        };
        let child = spawn_logged(cmd.args(&args), &self.log);
        self.child = Some(child);
        let logs = [self.log.as_path()];
        wait_for(
            "anvil to answer",
            Duration::from_secs(20),
            &logs,
            || async { self.try_rpc("eth_blockNumber", json!([])).await.ok() },
        )
        .await;
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The anvil process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c, sig);
        }
    }

    pub async fn try_rpc(&self, method: &str, params: Value) -> Result<Value, String> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let reply: Value = self
            .http
            .post(self.url())
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        match reply.get("error") {
            Some(e) => Err(e.to_string()),
            None => Ok(reply["result"].clone()),
        }
    }

    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        self.try_rpc(method, params)
            .await
            .unwrap_or_else(|e| panic!("anvil {method}: {e}"))
    }

    pub async fn mine(&self, blocks: u64) {
        self.rpc("anvil_mine", json!([format!("0x{blocks:x}")]))
            .await;
    }

    /// Mines here the blocks `heights` that `from` holds, so that this node
    /// ends with the same hashes (blocks of one parent and one timestamp are
    /// one block on every anvil of one genesis). anvil keeps the base fee of
    /// a reverted block for the next one, so it is set from `from`'s.
    pub async fn copy_blocks(&self, from: &Anvil, heights: std::ops::RangeInclusive<u64>) {
        for h in heights {
            let b = from
                .rpc("eth_getBlockByNumber", json!([format!("0x{h:x}"), false]))
                .await;
            let ts = u64::from_str_radix(
                b["timestamp"].as_str().unwrap().trim_start_matches("0x"),
                16,
            )
            .unwrap();
            self.rpc(
                "anvil_setNextBlockBaseFeePerGas",
                json!([b["baseFeePerGas"]]),
            )
            .await;
            self.rpc("evm_mine", json!([ts])).await;
        }
        let head = self.head().await;
        assert_eq!(
            self.hash(head).await,
            from.hash(head).await,
            "{} holds {}'s blocks",
            self.url(),
            from.url()
        );
    }

    pub async fn head(&self) -> u64 {
        let v = self.rpc("eth_blockNumber", json!([])).await;
        u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
    }

    pub async fn hash(&self, height: u64) -> String {
        let b = self
            .rpc(
                "eth_getBlockByNumber",
                json!([format!("0x{height:x}"), false]),
            )
            .await;
        b["hash"].as_str().expect("block hash").to_string()
    }
}

/// Mines a block every `every` on a background task until stopped.
pub struct Miner {
    mining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Miner {
    pub fn start(anvil: std::sync::Arc<Anvil>, every: Duration) -> Miner {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let mining = std::sync::Arc::new(AtomicBool::new(true));
        let on = mining.clone();
        let task = tokio::spawn(async move {
            while on.load(SeqCst) {
                anvil.mine(1).await;
                tokio::time::sleep(every).await;
            }
        });
        Miner { mining, task }
    }

    /// Stops after the block being mined, if any.
    pub async fn stop(self) {
        self.mining
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap();
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Aggregator {
    pub port: u16,
    pub metrics_port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Aggregator {
    pub async fn start(world: &World) -> Aggregator {
        Aggregator::start_with(world, "").await
    }

    /// Starts with extra TOML appended to the config (fleet settings, sinks).
    pub async fn start_with(world: &World, extra: &str) -> Aggregator {
        Aggregator::start_on(world, "127.0.0.1", extra).await
    }

    /// `start_with`, listening on `host` (queries still reach it on
    /// loopback when `host` is 0.0.0.0).
    pub async fn start_on(world: &World, host: &str, extra: &str) -> Aggregator {
        Aggregator::start_named(world, "aggregator", host, extra).await
    }

    /// One of several aggregators in one world (an HA pair): `name` names
    /// its config, data dir and log; all share the world's certificates.
    pub async fn start_named(world: &World, name: &str, host: &str, extra: &str) -> Aggregator {
        let port = free_port();
        let metrics_port = free_port();
        let pki = world.pki();
        let config = world.path().join(format!("{name}.toml"));
        fs::write(
            &config,
            format!(
                "listen = \"{host}:{port}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[store]\ncache_bytes = 16777216\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{extra}\n",
                world.path().join(format!("{name}-data")).display(),
                pki.ca_cert().display(),
                pki.cert("aggregator").display(),
                pki.key("aggregator").display()
            ),
        )
        .unwrap();
        let mut a = Aggregator {
            port,
            metrics_port,
            config,
            log: world.path().join(format!("{name}.log")),
            child: None,
        };
        a.restart(world).await;
        a
    }

    pub async fn restart(&mut self, world: &World) {
        self.child = Some(spawn_logged(
            Command::new(outpost_bin())
                .args(["aggregator", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "info"),
            &self.log,
        ));
        let conn = world.operator(self);
        let logs = [self.log.as_path()];
        wait_for(
            "the aggregator to serve queries",
            Duration::from_secs(20),
            &logs,
            || async {
                let mut c = outpost::operator::connect(&conn).await.ok()?;
                c.list_nodes(outpost::proto::ListNodesRequest {}).await.ok()
            },
        )
        .await;
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c, sig);
        }
    }

    /// The process's resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// The text of its `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Agent {
    pub node_id: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub data_dir: PathBuf,
    env: Vec<(String, String)>,
    netns: &'static str,
    child: Option<Child>,
}

/// Settings tests commonly change.
pub struct AgentOptions {
    pub poll_interval: &'static str,
    pub block_time: &'static str,
    pub stall_multiple: f64,
    pub extra_source: &'static str,
    /// More `[validate]` keys, one per line.
    pub extra_validate: &'static str,
    /// More tables at the end of the config.
    pub extra_tables: &'static str,
    /// `source.kind`.
    pub kind: &'static str,
    /// The fleet network the agent reports under.
    pub network: &'static str,
    /// Where the agent reaches the aggregator.
    pub aggregator_host: &'static str,
    /// A network namespace the agent runs in; empty: this one.
    pub netns: &'static str,
    /// Ports of more aggregators the agent reports to, after the one it
    /// starts with (an HA pair).
    pub also_report_to: Vec<u16>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            poll_interval: "100ms",
            block_time: "1s",
            stall_multiple: 3.0,
            extra_source: "",
            extra_validate: "",
            extra_tables: "",
            kind: "ethereum",
            network: "devnet",
            aggregator_host: "127.0.0.1",
            netns: "",
            also_report_to: Vec::new(),
        }
    }
}

impl Agent {
    pub fn start(
        world: &World,
        node_id: &str,
        rpc_url: &str,
        agg: &Aggregator,
        opts: AgentOptions,
    ) -> Agent {
        Agent::start_with_env(world, node_id, rpc_url, agg, opts, &[])
    }

    pub fn start_with_env(
        world: &World,
        node_id: &str,
        rpc_url: &str,
        agg: &Aggregator,
        opts: AgentOptions,
        env: &[(&str, &str)],
    ) -> Agent {
        world.issue(&Identity::Agent(node_id.into()));
        let pki = world.pki();
        let config = world.path().join(format!("{node_id}.toml"));
        let data_dir = world.path().join(format!("{node_id}-data"));
        fs::write(
            &config,
            format!(
                r#"node_id = "{node_id}"
network = "{network}"
data_dir = "{data}"
[source]
kind = "{kind}"
url = "{rpc_url}"
poll_interval = "{poll}"
timeout = "2s"
status_interval = "1s"
breaker_failures = 3
backoff_max = "1s"
{extra}
[validate]
expected_block_time = "{bt}"
stall_multiple = {sm}
{extra_validate}
[report]
aggregator = [{aggregators}]
server_name = "localhost"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
heartbeat_interval = "1s"
reconnect_min = "100ms"
reconnect_max = "1s"
{extra_tables}
"#,
                data = data_dir.display(),
                poll = opts.poll_interval,
                extra = opts.extra_source,
                bt = opts.block_time,
                sm = opts.stall_multiple,
                extra_validate = opts.extra_validate,
                extra_tables = opts.extra_tables,
                kind = opts.kind,
                network = opts.network,
                aggregators = std::iter::once(agg.port)
                    .chain(opts.also_report_to.iter().copied())
                    .map(|port| format!("\"https://{}:{port}\"", opts.aggregator_host))
                    .collect::<Vec<_>>()
                    .join(", "),
                ca = pki.ca_cert().display(),
                cert = pki.cert(&format!("agent-{node_id}")).display(),
                key = pki.key(&format!("agent-{node_id}")).display(),
            ),
        )
        .unwrap();
        let mut a = Agent {
            node_id: node_id.into(),
            config,
            log: world.path().join(format!("{node_id}.log")),
            data_dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: opts.netns,
            child: None,
        };
        a.restart();
        a
    }

    pub fn restart(&mut self) {
        let mut cmd = if self.netns.is_empty() {
            agent_command(&self.config)
        } else {
            // `ip netns exec` execs the agent: the child is the agent.
            let mut c = Command::new("ip");
            c.args([
                "netns",
                "exec",
                self.netns,
                outpost_bin(),
                "agent",
                "--config",
            ])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("OUTPOST_LOG_TARGET", "stderr");
            c
        };
        self.child = Some(spawn_logged(
            cmd.envs(self.env.iter().map(|(k, v)| (k, v))),
            &self.log,
        ));
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c, sig);
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        signal(&c, "TERM");
        c.wait().ok()
    }

    /// None while the process runs; its exit status once it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }
}

fn agent_command(config: &Path) -> Command {
    let mut c = Command::new(outpost_bin());
    c.args(["agent", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("OUTPOST_LOG_TARGET", "stderr");
    c
}

/// An agent process on `config`, logging to `log`, owned by the caller.
pub fn spawn_agent(config: &Path, log: &Path) -> Child {
    spawn_logged(&mut agent_command(config), log)
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn hex(bytes: &[u8]) -> String {
    outpost::model::hex(bytes)
}

/// The common set-up: one anvil, one aggregator, one agent beside the anvil,
/// and an operator's query client.
pub struct Solo {
    pub world: World,
    pub anvil: Anvil,
    pub agg: Aggregator,
    pub agent: Agent,
    pub q: QueryClient<Channel>,
}

impl Solo {
    pub async fn start(opts: AgentOptions) -> Solo {
        let world = World::new();
        let anvil = Anvil::start(&world, "anvil").await;
        let agg = Aggregator::start(&world).await;
        let agent = Agent::start(&world, "node-1", &anvil.url(), &agg, opts);
        let q = world.query(&agg).await;
        Solo {
            world,
            anvil,
            agg,
            agent,
            q,
        }
    }
}

/// Faults a proxy adds, changeable while it runs.
#[derive(Default)]
pub struct Faults {
    /// Added to every reply.
    pub delay_ms: std::sync::atomic::AtomicU64,
    /// Every n-th request gets HTTP 500 instead of a reply (0: none).
    pub fail_every: std::sync::atomic::AtomicU64,
    seen: std::sync::atomic::AtomicU64,
}

/// A JSON-RPC proxy on loopback in front of `upstream`: every reply passes
/// through `edit(request, reply)` before it goes back. Returns the proxy's URL.
pub async fn rpc_proxy<F>(upstream: String, edit: F) -> String
where
    F: Fn(&Value, &mut Value) + Send + Sync + 'static,
{
    faulty_proxy(upstream, edit, Default::default()).await
}

/// One request to a fixture server.
pub struct FixtureRequest {
    pub path: String,
    pub query: String,
    pub headers: hyper::HeaderMap,
    pub body: hyper::body::Bytes,
}

/// An HTTP server on loopback that answers every request with what
/// `handle` returns (status and a JSON body). Returns `http://127.0.0.1:port`.
pub async fn http_fixture<F, Fut>(handle: F) -> String
where
    F: Fn(FixtureRequest) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (u16, Vec<u8>)> + Send + 'static,
{
    http_fixture_with_switch(handle, Default::default()).await
}

/// `http_fixture`, with a switch: while `down` is on, the server closes
/// every connection, open or new, without answering, as a node that went
/// away.
pub async fn http_fixture_with_switch<F, Fut>(
    handle: F,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> String
where
    F: Fn(FixtureRequest) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (u16, Vec<u8>)> + Send + 'static,
{
    use http_body_util::{BodyExt, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if down.load(SeqCst) {
                drop(stream);
                continue;
            }
            let handle = handle.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handle = handle.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let query = req.uri().query().unwrap_or("").to_string();
                    let headers = req.headers().clone();
                    let body = req.into_body().collect().await?.to_bytes();
                    let (status, out) = handle(FixtureRequest {
                        path,
                        query,
                        headers,
                        body,
                    })
                    .await;
                    Ok::<_, hyper::Error>(
                        Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(out)))
                            .unwrap(),
                    )
                }
            });
            let down = down.clone();
            tokio::spawn(async move {
                let serve = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let gone = async {
                    while !down.load(SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                };
                // Dropping the connection closes its socket.
                tokio::select! {
                    _ = serve => {}
                    _ = gone => {}
                }
            });
        }
    });
    url
}

/// `rpc_proxy` that also delays or fails replies as `faults` says.
pub async fn faulty_proxy<F>(upstream: String, edit: F, faults: std::sync::Arc<Faults>) -> String
where
    F: Fn(&Value, &mut Value) + Send + Sync + 'static,
{
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;

    let edit = Arc::new(edit);
    let client = reqwest::Client::new();
    http_fixture(move |req| {
        let (edit, client, upstream, faults) = (
            edit.clone(),
            client.clone(),
            upstream.clone(),
            faults.clone(),
        );
        async move {
            let delay = faults.delay_ms.load(SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let n = faults.seen.fetch_add(1, SeqCst) + 1;
            let every = faults.fail_every.load(SeqCst);
            if every > 0 && n % every == 0 {
                return (500, b"upstream failed".to_vec());
            }
            let request: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let reply = match client
                .post(&upstream)
                .body(req.body.to_vec())
                .header("content-type", "application/json")
                .send()
                .await
            {
                Ok(r) => r.bytes().await.unwrap_or_default().to_vec(),
                Err(_) => Vec::new(),
            };
            let mut reply_json: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
            edit(&request, &mut reply_json);
            (200, serde_json::to_vec(&reply_json).unwrap())
        }
    })
    .await
}

/// An HTTP server that records every request body.
#[derive(Clone, Default)]
pub struct Recorder {
    got: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
}

impl Recorder {
    /// Starts on a free loopback port; returns it and its base URL.
    pub async fn start() -> (Recorder, String) {
        let rec = Recorder::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let r = rec.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let r = r.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let body = http_body_util::BodyExt::collect(req.into_body())
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
                                r.got.lock().unwrap().push((path, v));
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(hyper::body::Bytes::from_static(
                                        b"ok",
                                    )),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (rec, url)
    }

    /// Every body received so far, in order.
    pub fn bodies(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Debian's prometheus-alertmanager on loopback, from its package, with
/// `config` as its YAML; a member of a cluster when `peers` names the
/// cluster ports of others (gossip fast enough for a test).
pub struct Alertmanager {
    child: Option<Child>,
    pub url: String,
    pub cluster_port: u16,
    pub log: PathBuf,
}

impl Alertmanager {
    pub fn start(dir: &Path, config: &str, peers: &[u16]) -> Alertmanager {
        let bin = "/usr/bin/prometheus-alertmanager";
        assert!(
            Path::new(bin).exists(),
            "{bin} not found: install Debian's prometheus-alertmanager (tests/run.sh does)"
        );
        fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let cluster_port = free_port();
        let cfg = dir.join("alertmanager.yml");
        fs::write(&cfg, config).unwrap();
        let log = dir.join("alertmanager.log");
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--cluster.listen-address=127.0.0.1:{cluster_port}"))
            .arg(format!(
                "--cluster.advertise-address=127.0.0.1:{cluster_port}"
            ))
            .arg("--cluster.gossip-interval=100ms")
            .arg("--cluster.pushpull-interval=1s")
            .arg("--cluster.peer-timeout=3s");
        for p in peers {
            cmd.arg(format!("--cluster.peer=127.0.0.1:{p}"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("alertmanager starts");
        Alertmanager {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            cluster_port,
            log,
        }
    }

    /// Its alerts, or None while it does not answer.
    pub async fn alerts(&self) -> Option<Vec<Value>> {
        let v = get_json(&format!("{}/api/v2/alerts", self.url), &[]).await?;
        v.as_array().cloned()
    }

    /// The cluster members it sees once its gossip has settled (before,
    /// it may notify what another member already did), or None.
    pub async fn settled_peers(&self) -> Option<usize> {
        let v = get_json(&format!("{}/api/v2/status", self.url), &[]).await?;
        (v["cluster"]["status"] == "ready").then_some(())?;
        Some(v["cluster"]["peers"].as_array()?.len())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A process that is killed when the test ends.
pub struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn daemon(bin: &str, args: &[String], log: &Path) -> Daemon {
    assert!(
        Path::new(bin).exists(),
        "{bin} not found: install its Debian package (tests/run.sh does)"
    );
    Daemon(
        Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin} starts: {e}")),
    )
}

/// A GET of `url` with `query` parameters, as JSON; None while the server
/// does not answer or answers something else.
pub async fn get_json(url: &str, query: &[(&str, &str)]) -> Option<Value> {
    reqwest::Client::new()
        .get(url)
        .query(query)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Debian's Prometheus on a free loopback port with `config` (its YAML),
/// its files in `dir`; killed when dropped.
pub struct Prometheus {
    _daemon: Daemon,
    pub port: u16,
    pub log: PathBuf,
}

impl Prometheus {
    pub fn start(dir: &Path, config: &str) -> Prometheus {
        fs::create_dir_all(dir).unwrap();
        let config_file = dir.join("prometheus.yml");
        fs::write(&config_file, config).unwrap();
        let port = free_port();
        let log = dir.join("prometheus.log");
        let daemon = daemon(
            "/usr/bin/prometheus",
            &[
                format!("--config.file={}", config_file.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ],
            &log,
        );
        Prometheus {
            _daemon: daemon,
            port,
            log,
        }
    }

    /// `path` of its HTTP API (`/api/v1/alerts`), or None while it does
    /// not answer.
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        get_json(&format!("http://127.0.0.1:{}{path}", self.port), query).await
    }

    /// The value of the first series an instant PromQL query returns.
    pub async fn value(&self, promql: &str) -> Option<String> {
        let v = self.api("/api/v1/query", &[("query", promql)]).await?;
        Some(v["data"]["result"][0]["value"][1].as_str()?.to_string())
    }
}
