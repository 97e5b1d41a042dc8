//! Configuration files: TOML, every field documented in README.md, every
//! default chosen for a production node. `load_*` returns either a config or
//! a list of one-line problems that name the file and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Durability;
use crate::tls::{valid_name, Identity, TlsFiles};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Must equal the node id in the agent's certificate.
    pub node_id: String,
    /// Network name the fleet view groups nodes by.
    #[serde(default = "defaults::network")]
    pub network: String,
    #[serde(default = "defaults::agent_data_dir")]
    pub data_dir: PathBuf,
    pub source: SourceConfig,
    #[serde(default)]
    pub validate: ValidateConfig,
    #[serde(default)]
    pub store: AgentStoreConfig,
    pub report: ReportConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub host: HostConfig,
    #[serde(default)]
    pub metrics: AgentMetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// The agent's own listener for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentMetricsConfig {
    /// Where it listens (plain HTTP, so loopback or a private address);
    /// unset, the agent serves nothing.
    pub listen: Option<SocketAddr>,
}

/// The host probe: what it samples and when a resource counts as too busy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Time between samples; "0s" turns the probe off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub cpu_percent: f64,
    pub memory_percent: f64,
    /// Of the filesystems holding the node's data dir and Outpost's.
    pub disk_percent: f64,
    /// How long a resource must stay above its threshold before a finding opens.
    #[serde(with = "humantime_serde")]
    pub sustain: Duration,
    /// The node's data dir, for its disk use.
    pub node_data_dir: Option<PathBuf>,
    /// The node's process: by pid file, else by exact process name.
    pub node_pid_file: Option<PathBuf>,
    pub node_process: Option<String>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            interval: Duration::from_secs(15),
            cpu_percent: 80.0,
            memory_percent: 85.0,
            disk_percent: 90.0,
            sustain: Duration::from_secs(300),
            node_data_dir: None,
            node_pid_file: None,
            node_process: None,
        }
    }
}

/// Scheduled snapshots of the agent's store, and their retention.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Where snapshots go; unset, `<data_dir>-snapshots`. Start-up recovery
    /// restores from here.
    pub dir: Option<PathBuf>,
    /// Time between scheduled snapshots; "0s" turns the schedule off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Snapshots kept: the newest `keep`, and any younger than `max_age`.
    pub keep: usize,
    #[serde(with = "humantime_serde::option")]
    pub max_age: Option<Duration>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            dir: None,
            interval: Duration::from_secs(6 * 3600),
            keep: 4,
            max_age: None,
        }
    }
}

impl SnapshotConfig {
    /// The snapshot directory for a store at `data_dir`: `dir`, or else
    /// `<data_dir>-snapshots`.
    pub fn dir_for(&self, data_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| {
            let mut name = data_dir
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "store".into());
            name.push("-snapshots");
            data_dir.with_file_name(name)
        })
    }
}

impl AgentConfig {
    /// The snapshot directory, with its default applied.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.snapshot.dir_for(&self.data_dir)
    }
}

pub use crate::chain::SourceKind;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// The node's JSON-RPC endpoint.
    pub url: String,
    /// The node's WebSocket endpoint for new-head subscriptions (Ethereum,
    /// CometBFT). Each notice triggers a poll at once; polling at
    /// `poll_interval` goes on beside it.
    #[serde(default)]
    pub ws_url: Option<String>,
    #[serde(with = "humantime_serde", default = "defaults::poll_interval")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde", default = "defaults::timeout")]
    pub timeout: Duration,
    #[serde(default = "defaults::max_reply_bytes")]
    pub max_reply_bytes: usize,
    /// How often peers and sync state are read and reported.
    #[serde(with = "humantime_serde", default = "defaults::status_interval")]
    pub status_interval: Duration,
    /// Consecutive failed polls that open the circuit breaker (and the
    /// node-unreachable finding).
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// Longest wait between polls while the node keeps failing.
    #[serde(with = "humantime_serde", default = "defaults::backoff_max")]
    pub backoff_max: Duration,
    /// Most headers fetched in one poll when the node is far ahead.
    #[serde(default = "defaults::max_headers_per_poll")]
    pub max_headers_per_poll: u64,
    /// The network the node must be on (Ethereum: the chain id, e.g. "1").
    /// The agent refuses to monitor a node on another network.
    #[serde(default)]
    pub network_id: Option<String>,
    /// Bitcoin: the node's RPC cookie file (`<datadir>/.cookie`), read at
    /// every call so the new cookie of a restarted node is picked up.
    #[serde(default)]
    pub cookie_file: Option<PathBuf>,
    /// Bitcoin: `rpcuser`, with its password in `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TON: a file holding the HTTP API's key (sent as `X-API-Key`);
    /// Algorand: algod's API token (sent as `X-Algo-API-Token`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Prometheus: which series hold the height, peers, mempool, sync
    /// state and network.
    #[serde(default)]
    pub metrics: Option<crate::chain::prometheus::MetricMap>,
}

impl SourceConfig {
    /// The RPC credentials the config names (files, never inline secrets).
    pub fn auth(&self) -> crate::chain::rpc::Auth {
        use crate::chain::rpc::Auth;
        if let Some(file) = &self.token_file {
            return Auth::Header {
                name: self.kind.token_header(),
                value_file: file.clone(),
            };
        }
        match (&self.cookie_file, &self.user, &self.password_file) {
            (Some(cookie), _, _) => Auth::Cookie(cookie.clone()),
            (None, Some(user), Some(file)) => Auth::User {
                user: user.clone(),
                password_file: file.clone(),
            },
            _ => Auth::None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidateConfig {
    #[serde(with = "humantime_serde")]
    pub expected_block_time: Duration,
    /// A stall opens when no new head arrives for this many block times.
    pub stall_multiple: f64,
    /// How far back a reorg is followed before it counts as a broken chain.
    pub max_reorg_depth: u64,
    /// How much each header is checked; see `ValidationLevel`.
    pub level: ValidationLevel,
    /// Level `comprehensive` and up: how far a header's timestamp may lie
    /// ahead of this host's clock.
    #[serde(with = "humantime_serde")]
    pub future_tolerance: Duration,
    /// Share of failed RPC calls over `rpc_error_window` that opens `rpc-errors`.
    pub rpc_error_rate: f64,
    #[serde(with = "humantime_serde")]
    pub rpc_error_window: Duration,
    /// RPC p99 over a status interval that opens `slow-rpc`.
    #[serde(with = "humantime_serde")]
    pub slow_rpc_p99: Duration,
}

/// How much the agent checks. Each level does what the one before does, and more.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ValidationLevel {
    /// The head's height and hash only: one header fetched per poll, no
    /// linkage, reorg, stall or status checks.
    Minimal,
    /// Every header: linkage, reorgs, stalls, sync state and peers.
    #[default]
    Standard,
    /// Adds timestamp sanity (not ahead of the clock beyond
    /// `future_tolerance`, not before the parent's) and each header's fields
    /// against the protocol's bounds.
    Comprehensive,
    /// Adds recomputing every header's hash from its contents.
    Full,
}

impl ValidationLevel {
    pub fn label(self) -> &'static str {
        match self {
            ValidationLevel::Minimal => "minimal",
            ValidationLevel::Standard => "standard",
            ValidationLevel::Comprehensive => "comprehensive",
            ValidationLevel::Full => "full",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentStoreConfig {
    pub cache_bytes: u64,
    pub outbox_quota_bytes: u64,
    /// Headers kept below the head.
    pub retain_headers: u64,
    pub durability: Durability,
    /// Below this many free bytes on the store's filesystem the agent stops
    /// writing (and reading its node) until there is room again: a full
    /// disk would leave the store unwritable until a restart.
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// `https://host:port` of the aggregator, or a list of them (an HA pair):
    /// every event goes to each.
    pub aggregator: Aggregators,
    /// Name to check the aggregator's certificate against, when it differs
    /// from the host in `aggregator`.
    #[serde(default)]
    pub server_name: Option<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "defaults::batch_max_events")]
    pub batch_max_events: usize,
    /// Encoded bytes one batch may have (one event more when a single
    /// event is larger). The aggregator keeps a receive buffer per stream
    /// as large as the largest message the stream carried, so smaller
    /// batches cost it less memory per agent.
    #[serde(default = "defaults::batch_max_bytes")]
    pub batch_max_bytes: usize,
    #[serde(with = "humantime_serde", default = "defaults::heartbeat_interval")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde", default = "defaults::reconnect_min")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde", default = "defaults::reconnect_max")]
    pub reconnect_max: Duration,
}

/// `report.batch_max_bytes` by default.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 64 << 10;

/// At most this many aggregators in `report.aggregator`.
pub const MAX_AGGREGATORS: usize = 8;

/// `report.aggregator`: one URL or a list, always read as a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Aggregators(pub Vec<String>);

impl<'de> Deserialize<'de> for Aggregators {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a URL or a list of URLs")]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(Aggregators(match OneOrMany::deserialize(d)? {
            OneOrMany::One(url) => vec![url],
            OneOrMany::Many(urls) => urls,
        }))
    }
}

impl Aggregators {
    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for Aggregators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl ReportConfig {
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            crl: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `outpost=debug,warn`, ...
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    #[serde(default = "defaults::aggregator_data_dir")]
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    #[serde(default)]
    pub store: AggregatorStoreConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Alert sinks; none by default.
    #[serde(default, rename = "alert")]
    pub alerts: Vec<AlertSinkConfig>,
    /// Scheduled snapshots of the aggregator's store.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// What the aggregator's listener takes in at most; past a limit it refuses
/// new connections and keeps serving the ones it has.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections in all (the packaged unit allows 65,536 files).
    pub max_connections: usize,
    /// Open connections of one certificate identity (an agent needs one,
    /// an operator's CLI one per command).
    pub max_connections_per_identity: usize,
    /// Open connections without a client certificate: they only ever get
    /// an Unauthenticated answer, and are closed after
    /// `unauthenticated_lifetime`.
    pub max_unauthenticated: usize,
    #[serde(with = "humantime_serde")]
    pub unauthenticated_lifetime: Duration,
    /// Time from accept to the end of the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Query API calls per second per operator identity, refilling a bucket
    /// of `query_burst`; 0 turns the limit off.
    pub query_per_second: u32,
    pub query_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 16_384,
            max_connections_per_identity: 16,
            max_unauthenticated: 64,
            unauthenticated_lifetime: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_streams_per_connection: 16,
            query_per_second: 10,
            query_burst: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// A node more than this many blocks behind its network's head lags.
    pub lag_blocks: u64,
    /// ... or when the rest of the fleet reached its next block this long ago.
    #[serde(with = "humantime_serde")]
    pub lag_after: Duration,
    /// An agent with no message or heartbeat for this long is silent.
    #[serde(with = "humantime_serde")]
    pub silent_after: Duration,
    /// Nodes whose chain is canonical when nodes disagree (else the majority).
    pub reference_nodes: Vec<String>,
    /// Recent heights per node kept in memory for hash comparison.
    pub compare_window: u64,
    /// The networks agents may report under; empty: any, up to
    /// `max_networks`. An agent that names another is refused.
    pub networks: Vec<String>,
    /// Without `networks`, at most this many distinct networks are taken
    /// in (each has its own fleet state and metric labels).
    pub max_networks: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            lag_blocks: 5,
            lag_after: Duration::from_secs(60),
            silent_after: Duration::from_secs(60),
            reference_nodes: Vec::new(),
            compare_window: 256,
            networks: Vec::new(),
            max_networks: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where Prometheus scrapes `/metrics`.
    pub listen: SocketAddr,
    pub enabled: bool,
    /// Labels put on every series, so that the series of several
    /// aggregators (an HA pair, shards) stay apart when merged
    /// (`labels = { aggregator = "agg-eu-1" }`).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Label names the series use themselves, and Prometheus' own.
pub const SERIES_LABELS: [&str; 10] = [
    "network", "node", "quantile", "kind", "reason", "role", "name", "operator", "instance", "job",
];

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            enabled: true,
            labels: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AlertSinkKind {
    /// POST of the finding as JSON.
    Webhook,
    /// A Slack-compatible incoming webhook (`{"text": ...}`).
    Slack,
    /// Prometheus Alertmanager: POST /api/v2/alerts under the given base URL.
    Alertmanager,
    /// E-mail over SMTP: `smtp://host:587` with STARTTLS, or
    /// `smtps://host:465` with TLS from the first byte; never in the clear.
    Email,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertSinkConfig {
    pub kind: AlertSinkKind,
    pub url: String,
    #[serde(with = "humantime_serde", default = "defaults::alert_timeout")]
    pub timeout: Duration,
    /// Attempts per alert before it is logged as undeliverable.
    #[serde(default = "defaults::alert_attempts")]
    pub max_attempts: u32,
    /// `alertmanager` only: how often the open alerts are posted again, as
    /// Prometheus does; each stays active for four times this long, so an
    /// aggregator that dies lets its alerts expire while the other member of
    /// its pair keeps them.
    #[serde(with = "humantime_serde", default = "defaults::alert_resend")]
    pub resend: Duration,
    /// `email` only: the sender, the recipients, the SMTP login (the
    /// password is read from `password_file`, so it appears in no config),
    /// and a CA to trust for the server besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorStoreConfig {
    pub cache_bytes: u64,
    pub durability: Durability,
    /// Events kept per node in the event log.
    pub event_log_keep: u64,
    /// Below this many free bytes on the store's filesystem the aggregator
    /// takes in no batch (agents keep them) until there is room again.
    pub min_free_bytes: u64,
}

mod defaults {
    use super::*;
    pub fn network() -> String {
        "default".into()
    }
    pub fn agent_data_dir() -> PathBuf {
        "/var/lib/outpost/agent".into()
    }
    pub fn aggregator_data_dir() -> PathBuf {
        "/var/lib/outpost/aggregator".into()
    }
    pub fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_reply_bytes() -> usize {
        4 << 20
    }
    pub fn status_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn breaker_failures() -> u32 {
        3
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_headers_per_poll() -> u64 {
        256
    }
    pub fn batch_max_events() -> usize {
        1000
    }
    pub fn batch_max_bytes() -> usize {
        super::DEFAULT_BATCH_MAX_BYTES
    }
    pub fn heartbeat_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn reconnect_min() -> Duration {
        Duration::from_millis(500)
    }
    pub fn reconnect_max() -> Duration {
        Duration::from_secs(30)
    }
    pub fn alert_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn alert_attempts() -> u32 {
        8
    }
    pub fn alert_resend() -> Duration {
        Duration::from_secs(60)
    }
    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 7443))
    }
}

impl Default for ValidateConfig {
    fn default() -> Self {
        ValidateConfig {
            expected_block_time: Duration::from_secs(12),
            stall_multiple: 3.0,
            max_reorg_depth: 128,
            level: ValidationLevel::Standard,
            future_tolerance: Duration::from_secs(15),
            rpc_error_rate: 0.05,
            rpc_error_window: Duration::from_secs(300),
            slow_rpc_p99: Duration::from_secs(2),
        }
    }
}

impl Default for AgentStoreConfig {
    fn default() -> Self {
        AgentStoreConfig {
            cache_bytes: 4 << 20,
            outbox_quota_bytes: 64 << 20,
            retain_headers: 10_000,
            durability: Durability::ProcessCrash,
            min_free_bytes: 16 << 20,
        }
    }
}

impl Default for AggregatorStoreConfig {
    fn default() -> Self {
        AggregatorStoreConfig {
            cache_bytes: 256 << 20,
            durability: Durability::ProcessCrash,
            event_log_keep: 100_000,
            min_free_bytes: 64 << 20,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// Which mode a config file is for.
#[derive(Debug)]
pub enum AnyConfig {
    Agent(Box<AgentConfig>),
    Aggregator(Box<AggregatorConfig>),
}

/// Problems found in a config file, one line each, each naming the file.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))
}

/// Turns a TOML/serde error into one line with the line and column.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!(":{line}:{col}")
        })
        .unwrap_or_default();
    let msg = e.message().replace('\n', " ");
    format!("{}{at}: {}", path.display(), msg.trim())
}

pub fn load_agent(path: &Path) -> Result<AgentConfig, ConfigErrors> {
    parse_checked(path, &read(path)?)
}

pub fn load_aggregator(path: &Path) -> Result<AggregatorConfig, ConfigErrors> {
    parse_checked(path, &read(path)?)
}

/// Loads either kind: a file with a `[source]` table is an agent config, one
/// with a `[tls]` table an aggregator config.
pub fn load_any(path: &Path) -> Result<AnyConfig, ConfigErrors> {
    parse_any(path, &read(path)?)
}

/// `load_any` on text already read; `path` names the file in the errors.
pub fn parse_any(path: &Path, text: &str) -> Result<AnyConfig, ConfigErrors> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigErrors(vec![parse_error(path, text, &e)]))?;
    if table.contains_key("source") {
        parse_checked(path, text).map(|c| AnyConfig::Agent(Box::new(c)))
    } else if table.contains_key("tls") {
        parse_checked(path, text).map(|c| AnyConfig::Aggregator(Box::new(c)))
    } else {
        Err(ConfigErrors(vec![format!(
            "{}: neither an agent config (no [source] table) nor an aggregator config (no [tls] table)",
            path.display()
        )]))
    }
}

/// A config kind whose values are checked after parsing.
trait Checked: serde::de::DeserializeOwned {
    fn problems(&self, path: &Path) -> Vec<String>;
}

impl Checked for AgentConfig {
    fn problems(&self, path: &Path) -> Vec<String> {
        AgentConfig::problems(self, path)
    }
}

impl Checked for AggregatorConfig {
    fn problems(&self, path: &Path) -> Vec<String> {
        AggregatorConfig::problems(self, path)
    }
}

fn parse_checked<T: Checked>(path: &Path, text: &str) -> Result<T, ConfigErrors> {
    let cfg: T =
        toml::from_str(text).map_err(|e| ConfigErrors(vec![parse_error(path, text, &e)]))?;
    let problems = cfg.problems(path);
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(problems))
    }
}

struct Problems<'a> {
    path: &'a Path,
    list: Vec<String>,
}

impl Problems<'_> {
    fn check(&mut self, ok: bool, field: &str, msg: impl std::fmt::Display) {
        if !ok {
            self.list
                .push(format!("{}: {field}: {msg}", self.path.display()));
        }
    }

    /// The `[snapshot]` table, agent's or aggregator's.
    fn snapshot(&mut self, s: &SnapshotConfig, data_dir: &Path) {
        self.check(s.keep >= 1, "snapshot.keep", "must be at least 1");
        self.check(
            s.dir.as_deref() != Some(data_dir),
            "snapshot.dir",
            "must not be data_dir: a restore moves data_dir aside",
        );
    }

    fn readable(&mut self, field: &str, file: &Path) {
        if let Err(e) = std::fs::File::open(file) {
            self.list.push(format!(
                "{}: {field}: cannot read {}: {e}",
                self.path.display(),
                file.display()
            ));
        }
    }

    fn positive(&mut self, field: &str, d: Duration) {
        self.check(!d.is_zero(), field, "must be greater than zero");
    }
}

fn http_url(s: &str, schemes: &[&str]) -> Result<(), String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "{s:?} must start with {}://",
            schemes.join(":// or ")
        ));
    }
    if url.host_str().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    Ok(())
}

impl AgentConfig {
    /// Every problem with the config, one line each. Empty means usable.
    pub fn problems(&self, path: &Path) -> Vec<String> {
        let mut p = Problems {
            path,
            list: Vec::new(),
        };
        p.check(
            valid_name(&self.node_id),
            "node_id",
            format!(
                "{:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                self.node_id
            ),
        );
        p.check(
            valid_name(&self.network),
            "network",
            format!(
                "{:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                self.network
            ),
        );
        if let Err(e) = http_url(&self.source.url, &["http", "https"]) {
            p.check(false, "source.url", e);
        }
        if let Some(Err(e)) = self
            .source
            .ws_url
            .as_deref()
            .map(|u| http_url(u, &["ws", "wss"]))
        {
            p.check(false, "source.ws_url", e);
        }
        let s = &self.source;
        p.check(
            !(s.cookie_file.is_some() && s.user.is_some()),
            "source.cookie_file",
            "set either cookie_file or user and password_file, not both",
        );
        p.check(
            s.user.is_some() == s.password_file.is_some(),
            "source.user",
            "user and password_file go together",
        );
        if let Some(file) = &s.password_file {
            p.readable("source.password_file", file);
        }
        if let Some(file) = &s.token_file {
            p.readable("source.token_file", file);
        }
        match (&s.metrics, s.kind) {
            (None, SourceKind::Prometheus) => p.check(
                false,
                "source.metrics",
                "kind prometheus needs a [source.metrics] table that names at least the height metric",
            ),
            (Some(_), kind) if kind != SourceKind::Prometheus => p.check(
                false,
                "source.metrics",
                "only kind prometheus reads metrics",
            ),
            (Some(m), _) => {
                for (key, why) in m.problems() {
                    p.check(false, key, why);
                }
                p.check(
                    s.network_id.is_none() || m.network.is_some(),
                    "source.network_id",
                    "kind prometheus checks the network through source.metrics.network; set it or drop network_id",
                );
            }
            (None, _) => {}
        }
        p.positive("source.poll_interval", self.source.poll_interval);
        p.positive("source.timeout", self.source.timeout);
        p.positive("source.status_interval", self.source.status_interval);
        p.check(
            self.source.max_reply_bytes >= 1024,
            "source.max_reply_bytes",
            "must be at least 1024",
        );
        p.check(
            self.source.breaker_failures >= 1,
            "source.breaker_failures",
            "must be at least 1",
        );
        p.check(
            self.source.max_headers_per_poll >= 1,
            "source.max_headers_per_poll",
            "must be at least 1",
        );
        p.positive(
            "validate.expected_block_time",
            self.validate.expected_block_time,
        );
        p.check(
            self.validate.stall_multiple >= 1.0,
            "validate.stall_multiple",
            "must be at least 1.0",
        );
        p.positive("validate.future_tolerance", self.validate.future_tolerance);
        p.positive("validate.rpc_error_window", self.validate.rpc_error_window);
        p.positive("validate.slow_rpc_p99", self.validate.slow_rpc_p99);
        p.check(
            self.validate.rpc_error_rate > 0.0 && self.validate.rpc_error_rate <= 1.0,
            "validate.rpc_error_rate",
            "must be above 0 and at most 1",
        );
        p.check(
            self.validate.max_reorg_depth >= 1,
            "validate.max_reorg_depth",
            "must be at least 1",
        );
        p.snapshot(&self.snapshot, &self.data_dir);
        p.check(
            self.store.outbox_quota_bytes >= 64 * 1024,
            "store.outbox_quota_bytes",
            "must be at least 65536",
        );
        p.check(
            self.store.retain_headers >= self.validate.max_reorg_depth,
            "store.retain_headers",
            "must be at least validate.max_reorg_depth, or reorgs cannot be traced",
        );
        let urls = self.report.aggregator.urls();
        p.check(
            (1..=MAX_AGGREGATORS).contains(&urls.len()),
            "report.aggregator",
            format!("must name from 1 to {MAX_AGGREGATORS} aggregators"),
        );
        for (i, url) in urls.iter().enumerate() {
            if let Err(e) = http_url(url, &["https"]) {
                p.check(false, "report.aggregator", e);
            }
            p.check(
                !urls[..i].contains(url),
                "report.aggregator",
                format!("{url:?} is listed twice"),
            );
        }
        p.check(
            (1..=crate::wire::MAX_EVENTS_PER_BATCH).contains(&self.report.batch_max_events),
            "report.batch_max_events",
            format!(
                "must be from 1 to {} (what an aggregator takes in one message)",
                crate::wire::MAX_EVENTS_PER_BATCH
            ),
        );
        p.check(
            (1024..=crate::wire::MAX_MESSAGE_BYTES / 4).contains(&self.report.batch_max_bytes),
            "report.batch_max_bytes",
            format!(
                "must be from 1024 to {} bytes",
                crate::wire::MAX_MESSAGE_BYTES / 4
            ),
        );
        p.positive("report.heartbeat_interval", self.report.heartbeat_interval);
        p.positive("report.reconnect_min", self.report.reconnect_min);
        p.check(
            self.report.reconnect_max >= self.report.reconnect_min,
            "report.reconnect_max",
            "must be at least report.reconnect_min",
        );
        p.readable("report.ca", &self.report.ca);
        p.readable("report.key", &self.report.key);
        p.readable("report.cert", &self.report.cert);
        if std::fs::File::open(&self.report.cert).is_ok() {
            match self.report.tls().own_identity() {
                Ok(Some(Identity::Agent(id))) if id == self.node_id => {}
                Ok(Some(other)) => p.check(
                    false,
                    "report.cert",
                    format!(
                        "certificate is for {other}, but node_id is {:?}",
                        self.node_id
                    ),
                ),
                _ => p.check(
                    false,
                    "report.cert",
                    "not an Outpost agent certificate (no outpost://agent/ SAN)",
                ),
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.check(
                false,
                "log.level",
                format!("{:?} is not a valid filter", self.log.level),
            );
        }
        p.list
    }
}

impl AggregatorConfig {
    pub fn problems(&self, path: &Path) -> Vec<String> {
        let mut p = Problems {
            path,
            list: Vec::new(),
        };
        p.readable("tls.ca", &self.tls.ca);
        p.readable("tls.cert", &self.tls.cert);
        p.readable("tls.key", &self.tls.key);
        if let Some(crl) = &self.tls.crl {
            p.readable("tls.crl", crl);
        }
        let l = &self.limits;
        for (field, value) in [
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_connections_per_identity",
                l.max_connections_per_identity,
            ),
            ("limits.max_unauthenticated", l.max_unauthenticated),
            (
                "limits.max_streams_per_connection",
                l.max_streams_per_connection as usize,
            ),
        ] {
            p.check(value >= 1, field, "must be at least 1");
        }
        p.check(
            l.query_per_second == 0 || l.query_burst >= 1,
            "limits.query_burst",
            "must be at least 1 while limits.query_per_second is set",
        );
        p.positive("limits.handshake_timeout", l.handshake_timeout);
        p.positive(
            "limits.unauthenticated_lifetime",
            l.unauthenticated_lifetime,
        );
        p.check(
            self.store.event_log_keep >= 1,
            "store.event_log_keep",
            "must be at least 1",
        );
        p.snapshot(&self.snapshot, &self.data_dir);
        p.positive("fleet.silent_after", self.fleet.silent_after);
        p.positive("fleet.lag_after", self.fleet.lag_after);
        p.check(
            self.fleet.compare_window >= 8,
            "fleet.compare_window",
            "must be at least 8",
        );
        for id in &self.fleet.reference_nodes {
            p.check(
                valid_name(id),
                "fleet.reference_nodes",
                format!("{id:?} is not a node id"),
            );
        }
        for net in &self.fleet.networks {
            p.check(
                valid_name(net),
                "fleet.networks",
                format!("{net:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"),
            );
        }
        p.check(
            self.fleet.max_networks >= 1,
            "fleet.max_networks",
            "must be at least 1",
        );
        p.check(
            !self.metrics.enabled || self.metrics.listen != self.listen,
            "metrics.listen",
            "must differ from listen",
        );
        for name in self.metrics.labels.keys() {
            let well_formed = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with("__");
            p.check(
                well_formed,
                &format!("metrics.labels.{name}"),
                "a label name is letters, digits and _, not starting with a digit or __",
            );
            p.check(
                !SERIES_LABELS.contains(&name.as_str()),
                &format!("metrics.labels.{name}"),
                format!(
                    "is a label of the series themselves or of Prometheus ({})",
                    SERIES_LABELS.join(", ")
                ),
            );
        }
        for (i, sink) in self.alerts.iter().enumerate() {
            let email = sink.kind == AlertSinkKind::Email;
            let schemes: &[&str] = if email {
                &["smtp", "smtps"]
            } else {
                &["http", "https"]
            };
            if let Err(e) = http_url(&sink.url, schemes) {
                p.check(false, &format!("alert[{i}].url"), e);
            }
            if email {
                let from = sink.from.as_deref().unwrap_or("");
                p.check(
                    from.parse::<lettre::message::Mailbox>().is_ok(),
                    &format!("alert[{i}].from"),
                    format!(
                        "{from:?} is not an e-mail address (\"Outpost <outpost@example.net>\")"
                    ),
                );
                p.check(
                    !sink.to.is_empty(),
                    &format!("alert[{i}].to"),
                    "an email sink needs at least one recipient",
                );
                for (j, to) in sink.to.iter().enumerate() {
                    p.check(
                        to.parse::<lettre::message::Mailbox>().is_ok(),
                        &format!("alert[{i}].to[{j}]"),
                        format!("{to:?} is not an e-mail address"),
                    );
                }
                p.check(
                    sink.username.is_some() == sink.password_file.is_some(),
                    &format!("alert[{i}].password_file"),
                    "username and password_file go together",
                );
                if let Some(f) = &sink.password_file {
                    p.readable(&format!("alert[{i}].password_file"), f);
                }
                if let Some(f) = &sink.ca {
                    p.readable(&format!("alert[{i}].ca"), f);
                }
            } else {
                p.check(
                    sink.from.is_none()
                        && sink.to.is_empty()
                        && sink.username.is_none()
                        && sink.password_file.is_none()
                        && sink.ca.is_none(),
                    &format!("alert[{i}]"),
                    "from, to, username, password_file and ca belong to kind email",
                );
            }
            p.check(
                sink.max_attempts >= 1,
                &format!("alert[{i}].max_attempts"),
                "must be at least 1",
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.check(
                false,
                "log.level",
                format!("{:?} is not a valid filter", self.log.level),
            );
        }
        p.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.toml",
            "node_id = \"n1\"\n[source\nkind = 1\n",
        );
        let e = load_agent(&p).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(
            e.0[0].starts_with(&format!("{}:2:", p.display())),
            "{}",
            e.0[0]
        );
        assert!(!e.0[0].contains('\n'));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_each_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.toml",
            r#"
node_id = "bad id!"
[source]
kind = "ethereum"
url = "ftp://x"
poll_interval = "0s"
[report]
aggregator = "http://agg:7443"
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/c.pem"
key = "/nonexistent/k.pem"
"#,
        );
        let e = load_agent(&p).unwrap_err().0;
        let joined = e.join("\n");
        for needle in [
            "node_id",
            "source.url",
            "source.poll_interval",
            "report.aggregator",
            "report.ca",
        ] {
            assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
        }
        let p = write(dir.path(), "b.toml", "node_id = \"n\"\nbogus = 1\n");
        let e = load_agent(&p).unwrap_err().0;
        assert!(e[0].contains("bogus"), "{e:?}");
    }

    #[test]
    fn metric_maps_belong_to_kind_prometheus_and_must_parse() {
        let dir = tempfile::tempdir().unwrap();
        let config = |kind: &str, tail: &str| {
            let p = write(
                dir.path(),
                "m.toml",
                &format!(
                    "node_id = \"n\"\n[report]\naggregator = \"https://a:7443\"\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n\
                     [source]\nkind = \"{kind}\"\nurl = \"http://n:9100/metrics\"\n{tail}"
                ),
            );
            load_agent(&p)
                .err()
                .map(|e| e.0.join("\n"))
                .unwrap_or_default()
        };
        let e = config("prometheus", "");
        assert!(e.contains("source.metrics: kind prometheus needs"), "{e}");
        let e = config("ethereum", "[source.metrics]\nheight = \"h\"\n");
        assert!(e.contains("source.metrics: only kind prometheus"), "{e}");
        let e = config(
            "prometheus",
            "network_id = \"x\"\n[source.metrics]\nheight = \"h{a=1}\"\n",
        );
        assert!(e.contains("source.metrics.height"), "{e}");
        assert!(e.contains("source.network_id: kind prometheus"), "{e}");
        let e = config("prometheus", "[source.metrics]\nheight = \"h\"\n");
        assert!(!e.contains("source."), "a good map is accepted: {e}");
    }

    #[test]
    fn batch_bytes_must_hold_a_batch_the_aggregator_takes() {
        let dir = tempfile::tempdir().unwrap();
        let errors = |bytes: usize| {
            let p = write(
                dir.path(),
                "b.toml",
                &format!(
                    "node_id = \"n\"\n[report]\naggregator = \"https://a:1\"\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n\
                     batch_max_bytes = {bytes}\n[source]\nkind = \"ethereum\"\nurl = \"http://n:8545\"\n"
                ),
            );
            load_agent(&p)
                .err()
                .map(|e| e.0.join("\n"))
                .unwrap_or_default()
        };
        for bad in [0, 1023, crate::wire::MAX_MESSAGE_BYTES] {
            assert!(
                errors(bad).contains("report.batch_max_bytes: must be from 1024 to"),
                "{bad}: {}",
                errors(bad)
            );
        }
        for good in [
            1024,
            DEFAULT_BATCH_MAX_BYTES,
            crate::wire::MAX_MESSAGE_BYTES / 4,
        ] {
            assert!(
                !errors(good).contains("batch_max_bytes"),
                "{good}: {}",
                errors(good)
            );
        }
    }

    #[test]
    fn report_aggregator_is_one_url_or_a_list_of_distinct_ones() {
        let dir = tempfile::tempdir().unwrap();
        let config = |aggregator: &str| {
            let p = write(
                dir.path(),
                "r.toml",
                &format!(
                    "node_id = \"n\"\n[report]\naggregator = {aggregator}\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n\
                     [source]\nkind = \"ethereum\"\nurl = \"http://n:8545\"\n"
                ),
            );
            load_agent(&p)
                .err()
                .map(|e| e.0.join("\n"))
                .unwrap_or_default()
        };
        let urls = |aggregator: &str| {
            toml::from_str::<ReportConfig>(&format!(
                "aggregator = {aggregator}\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n"
            ))
            .unwrap()
            .aggregator
            .urls()
            .to_vec()
        };
        assert_eq!(urls("\"https://a:1\""), ["https://a:1"]);
        let pair = "[\"https://a:1\", \"https://b:1\"]";
        assert_eq!(urls(pair), ["https://a:1", "https://b:1"]);
        for good in ["\"https://a:1\"", pair] {
            let e = config(good);
            assert!(!e.contains("report.aggregator"), "{good}: {e}");
        }
        for (bad, says) in [
            ("[\"https://a:1\", \"https://a:1\"]", "listed twice"),
            ("[]", "from 1 to 8"),
            (
                "[\"https://a:1\", \"http://b:1\"]",
                "must start with https://",
            ),
            ("3", "a URL or a list of URLs"),
        ] {
            assert!(config(bad).contains(says), "{bad}: {}", config(bad));
        }
    }

    #[test]
    fn metric_labels_must_not_take_a_name_the_series_use() {
        let mut cfg: AggregatorConfig = toml::from_str(
            "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[metrics]\nlabels = { aggregator = \"a1\", node = \"x\", \"9x\" = \"y\" }\n",
        )
        .unwrap();
        let e = cfg.problems(Path::new("agg.toml")).join("\n");
        assert!(e.contains("metrics.labels.node"), "{e}");
        assert!(e.contains("metrics.labels.9x"), "{e}");
        assert!(!e.contains("metrics.labels.aggregator"), "{e}");
        cfg.metrics.labels.retain(|k, _| k == "aggregator");
        let e = cfg.problems(Path::new("agg.toml")).join("\n");
        assert!(!e.contains("metrics.labels"), "{e}");
    }

    #[test]
    fn load_any_tells_the_kinds_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "c.toml", "x = 1\n");
        let e = load_any(&p).unwrap_err().0;
        assert!(e[0].contains("neither an agent config"));
    }
}

#[cfg(test)]
mod packaged_examples {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packaging")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The shipped examples state every default; they must match the code.
    #[test]
    fn agent_example_shows_the_real_defaults() {
        let cfg: AgentConfig = parse("agent.toml");
        assert_eq!(cfg.validate, ValidateConfig::default());
        assert_eq!(cfg.store, AgentStoreConfig::default());
        assert_eq!(cfg.log, LogConfig::default());
        assert_eq!(cfg.metrics, AgentMetricsConfig::default());
        assert_eq!(cfg.network, defaults::network());
        assert_eq!(cfg.data_dir, defaults::agent_data_dir());
        let s = &cfg.source;
        assert_eq!(s.poll_interval, defaults::poll_interval());
        assert_eq!(s.timeout, defaults::timeout());
        assert_eq!(s.max_reply_bytes, defaults::max_reply_bytes());
        assert_eq!(s.status_interval, defaults::status_interval());
        assert_eq!(s.breaker_failures, defaults::breaker_failures());
        assert_eq!(s.backoff_max, defaults::backoff_max());
        assert_eq!(s.max_headers_per_poll, defaults::max_headers_per_poll());
        let r = &cfg.report;
        assert_eq!(r.batch_max_events, defaults::batch_max_events());
        assert_eq!(r.batch_max_bytes, defaults::batch_max_bytes());
        assert_eq!(r.heartbeat_interval, defaults::heartbeat_interval());
        assert_eq!(r.reconnect_min, defaults::reconnect_min());
        assert_eq!(r.reconnect_max, defaults::reconnect_max());
    }

    #[test]
    fn aggregator_example_shows_the_real_defaults() {
        let cfg: AggregatorConfig = parse("aggregator.toml");
        assert_eq!(cfg.listen, defaults::listen());
        assert_eq!(cfg.data_dir, defaults::aggregator_data_dir());
        assert_eq!(cfg.store, AggregatorStoreConfig::default());
        assert_eq!(cfg.fleet, FleetConfig::default());
        assert_eq!(cfg.metrics, MetricsConfig::default());
        assert_eq!(cfg.limits, LimitsConfig::default());
        assert_eq!(cfg.log, LogConfig::default());
    }
}
