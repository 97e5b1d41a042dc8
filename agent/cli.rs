//! The command line, as clap parses it. Acting on it lives in main.rs and
//! the modules it calls.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "outpost",
    version,
    about = "Node sidecar and fleet aggregator for blockchain operators"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent beside one chain node.
    Agent {
        #[arg(long, short, default_value = "/etc/outpost/agent.toml")]
        config: PathBuf,
    },
    /// Run the aggregator.
    Aggregator {
        #[arg(long, short, default_value = "/etc/outpost/aggregator.toml")]
        config: PathBuf,
    },
    /// Validate a config file (agent or aggregator); one line per problem.
    CheckConfig { config: PathBuf },
    /// Make a private CA and certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Ask the aggregator about the fleet.
    Query(QueryArgs),
    /// Run an aggregator and three agents on built-in simulated chains and
    /// print the fleet as it changes.
    Demo {
        /// Stop after this long (e.g. 30s); runs until Ctrl-C without it.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// Snapshots of a stopped agent's or aggregator's store.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Write man pages and shell completions into a directory (used when
    /// building the packages).
    #[command(hide = true)]
    PackageAssets {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create a CA and the aggregator's server certificate.
    Init {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Extra DNS names or IP addresses for the aggregator certificate.
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Issue a client certificate signed by the CA in --dir.
    Issue {
        role: Role,
        /// Node id (agent) or operator name.
        name: String,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Issue the server certificate of one more aggregator (a pair's second
    /// member, another shard) signed by the CA in --dir:
    /// aggregator-NAME.pem and .key, valid for NAME and every --san.
    Server {
        /// The aggregator's name (its host name, usually).
        name: String,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Extra DNS names or IP addresses agents and operators reach it by.
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Add an issued client certificate to the CA's revocation list
    /// (--dir/crl.pem); aggregators that load it (tls.crl) refuse the
    /// certificate at the handshake after a reload.
    Revoke {
        role: Role,
        /// Node id (agent) or operator name.
        name: String,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Write a snapshot of the store named in a config. A running agent is
    /// asked through its admin socket and writes into its snapshot dir; a
    /// stopped agent's or aggregator's store is read directly.
    Create {
        /// The agent or aggregator config whose data_dir to snapshot.
        #[arg(long, short)]
        config: PathBuf,
        /// Directory to write the snapshot into (default: the agent's
        /// snapshot.dir; required for an aggregator).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Snapshots in a directory, newest first.
    List { dir: PathBuf },
    /// Re-read a snapshot and check every checksum.
    Verify { file: PathBuf },
    /// Restore a snapshot into a data dir; an existing store is moved aside.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// Replace a store that is newer than the snapshot.
        #[arg(long)]
        force: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Operator,
}

/// How to reach the aggregator as an operator. Each flag can also come from
/// the environment variable named in its help.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The aggregator's URL. Repeat the flag, or give a comma list, to ask
    /// several (shards, an HA pair): `nodes`, `node` and `fleet` merge
    /// their answers.
    #[arg(
        long,
        env = "OUTPOST_ENDPOINT",
        default_value = "https://localhost:7443",
        value_delimiter = ',',
        global = true
    )]
    pub endpoint: Vec<String>,
    /// CA certificate that signed the aggregator's certificate.
    #[arg(long, env = "OUTPOST_CA", default_value = "pki/ca.pem", global = true)]
    pub ca: PathBuf,
    /// Operator certificate.
    #[arg(long, env = "OUTPOST_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Operator private key.
    #[arg(long, env = "OUTPOST_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Name to verify the aggregator's certificate against (default: the endpoint's host).
    #[arg(long, env = "OUTPOST_SERVER_NAME", global = true)]
    pub server_name: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub command: QueryCommand,
}

#[derive(Subcommand, Debug)]
pub enum QueryCommand {
    /// Every node: chain, head, last seen, status.
    Nodes,
    /// One node in detail.
    Node { node_id: String },
    /// Findings, newest last.
    Findings {
        #[arg(long)]
        node: Option<String>,
        /// A finding kind as the findings print it: reorg, stall, unreachable, divergence,
        /// lag, agent-silent, agent-paused, … (README.md, "Findings", lists them all)
        #[arg(long)]
        kind: Option<String>,
        /// RFC 3339 time (2026-01-02T03:04:05Z) or an age (10m, 2h).
        #[arg(long)]
        since: Option<String>,
        /// Only findings that are still open.
        #[arg(long)]
        open: bool,
    },
    /// Stored headers of one node.
    Headers {
        node_id: String,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
    },
    /// Per network: fleet head, each node's height, lag, hash agreement and open findings.
    Fleet {
        #[arg(long)]
        network: Option<String>,
    },
    /// Print findings as they open and resolve, until interrupted.
    Watch {
        #[arg(long)]
        network: Option<String>,
    },
    /// The stored event log of one node, from a seq.
    Events {
        node_id: String,
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

impl QueryCommand {
    /// The subcommand's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            QueryCommand::Nodes => "nodes",
            QueryCommand::Node { .. } => "node",
            QueryCommand::Findings { .. } => "findings",
            QueryCommand::Headers { .. } => "headers",
            QueryCommand::Fleet { .. } => "fleet",
            QueryCommand::Watch { .. } => "watch",
            QueryCommand::Events { .. } => "events",
        }
    }
}
