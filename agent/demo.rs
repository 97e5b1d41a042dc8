//! `outpost demo`: an aggregator and three agents on built-in simulated
//! chains (one steady, one that reorgs, one that lags), with certificates
//! made in a temp dir. It runs the real ingest, store, stream and query
//! paths and prints the fleet and its findings as they happen.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::aggregator::Aggregator;
use crate::chain::sim::{Behaviour, SimNode};
use crate::cli::Connection;
use crate::config::{
    AgentConfig, AgentStoreConfig, AggregatorConfig, AggregatorStoreConfig, FleetConfig, LogConfig,
    MetricsConfig, ReportConfig, SourceConfig, SourceKind, ValidateConfig,
};
use crate::node::Agent;
use crate::operator;
use crate::proto::{FleetRequest, ListFindingsRequest};
use crate::tls::{self, Identity, PkiLayout, TlsFiles};

const BLOCK_TIME: Duration = Duration::from_secs(1);

/// The demo's certificates outlast the week inside which the aggregator
/// warns of expiry.
const CERT_DAYS: i64 = 30;

fn agent_config(dir: &Path, node: &str, url: &str, aggregator: &str) -> AgentConfig {
    let pki = PkiLayout::new(dir.join("pki"));
    AgentConfig {
        node_id: node.into(),
        network: "simnet".into(),
        data_dir: dir.join(node),
        snapshot: Default::default(),
        host: Default::default(),
        metrics: Default::default(),
        source: SourceConfig {
            kind: SourceKind::Ethereum,
            url: url.into(),
            poll_interval: Duration::from_millis(250),
            timeout: Duration::from_secs(2),
            max_reply_bytes: 1 << 20,
            status_interval: Duration::from_secs(2),
            breaker_failures: 3,
            backoff_max: Duration::from_secs(5),
            max_headers_per_poll: 256,
            network_id: Some("31337".into()),
            cookie_file: None,
            user: None,
            password_file: None,
            token_file: None,
            metrics: None,
            ws_url: None,
        },
        validate: ValidateConfig {
            expected_block_time: BLOCK_TIME,
            stall_multiple: 5.0,
            max_reorg_depth: 64,
            ..ValidateConfig::default()
        },
        store: AgentStoreConfig::default(),
        report: ReportConfig {
            aggregator: crate::config::Aggregators(vec![aggregator.into()]),
            server_name: Some("localhost".into()),
            ca: pki.ca_cert(),
            cert: pki.cert(&format!("agent-{node}")),
            key: pki.key(&format!("agent-{node}")),
            batch_max_events: 1000,
            batch_max_bytes: crate::config::DEFAULT_BATCH_MAX_BYTES,
            heartbeat_interval: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(2),
        },
        log: LogConfig::default(),
    }
}

pub async fn run(duration: Option<Duration>) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("outpost-demo-").tempdir()?;
    let dir = tmp.path();
    let pki_dir = dir.join("pki");
    tls::init_pki(&pki_dir, &[], CERT_DAYS).context("making demo certificates")?;
    let nodes = [
        ("node-1", Behaviour::Steady),
        (
            "node-2",
            // Eight blocks on the side branch keep the divergence open past
            // its grace and a few of the three-second frames below.
            Behaviour::Reorg {
                every: 16,
                depth: 8,
            },
        ),
        ("node-3", Behaviour::Lag { factor: 3 }),
    ];
    for (node, _) in &nodes {
        tls::issue_client(&pki_dir, &Identity::Agent((*node).into()), CERT_DAYS)?;
    }
    tls::issue_client(&pki_dir, &Identity::Operator("demo".into()), CERT_DAYS)?;
    let pki = PkiLayout::new(&pki_dir);

    let agg = Aggregator::bind(AggregatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.join("aggregator"),
        tls: TlsFiles {
            ca: pki.ca_cert(),
            cert: pki.cert("aggregator"),
            key: pki.key("aggregator"),
            crl: None,
        },
        store: AggregatorStoreConfig {
            cache_bytes: 16 << 20,
            ..Default::default()
        },
        snapshot: Default::default(),
        fleet: FleetConfig {
            silent_after: Duration::from_secs(10),
            // With node-3 behind, two nodes compare at the top: a reference
            // node decides who is on the side branch.
            reference_nodes: vec!["node-1".into()],
            ..Default::default()
        },
        // The fleet page and /metrics, on a free loopback port.
        metrics: MetricsConfig {
            listen: "127.0.0.1:0".parse()?,
            ..Default::default()
        },
        alerts: Vec::new(),
        limits: Default::default(),
        log: LogConfig::default(),
    })
    .await?;
    let endpoint = format!("https://{}", agg.local_addr()?);
    let page = agg.metrics_addr().map(|a| format!("http://{a}/"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    actix::spawn(async move {
        if let Err(e) = agg
            .serve(async {
                let _ = stop_rx.await;
            })
            .await
        {
            eprintln!("demo aggregator failed: {e:#}");
        }
    });

    let mut sims = Vec::new();
    let mut agents = Vec::new();
    for (node, behaviour) in nodes {
        let sim = SimNode::start(behaviour, BLOCK_TIME).await?;
        agents.push(Agent::start(&agent_config(dir, node, &sim.url, &endpoint))?);
        println!("{node}: {behaviour}, simulated at {}", sim.url);
        sims.push(sim);
    }
    println!(
        "aggregator at {endpoint}; data and certificates in {}",
        dir.display()
    );
    if let Some(page) = &page {
        println!("live fleet page at {page}");
    }
    println!("press Ctrl-C to stop\n");

    let conn = Connection {
        endpoint: vec![endpoint.clone()],
        ca: pki.ca_cert(),
        cert: Some(pki.cert("operator-demo")),
        key: Some(pki.key("operator-demo")),
        server_name: Some("localhost".into()),
        json: false,
    };
    let mut client = operator::connect(&conn).await?;
    let started = tokio::time::Instant::now();
    // Each finding change is printed once its verdict is decided (a reorg's
    // waits for the peers), or once it is older than that wait.
    let mut printed = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::service::shutdown_signal() => break,
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let now = crate::model::now_unix_ms();
        let findings = client
            .list_findings(ListFindingsRequest {
                since_unix_ms: now - 60_000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .findings;
        for nf in &findings {
            let Some(f) = &nf.finding else { continue };
            let changed = f.opened_at_unix_ms.max(f.resolved_at_unix_ms);
            let settled = f.verdict() != crate::proto::Verdict::Unspecified
                || now - changed > crate::aggregator::judge::CORROBORATE_MS + 2_000;
            if settled && printed.insert((nf.node_id.clone(), f.id.clone(), f.state)) {
                println!("  finding: {}", operator::finding_line(&nf.node_id, f));
            }
        }
        // The fleet view: each node against its network (diverged,
        // lagging), with the open findings and whose fault they are.
        let networks = client
            .fleet(FleetRequest {
                network: String::new(),
            })
            .await?
            .into_inner()
            .networks;
        print!("{}", operator::fleet_table(&networks));
    }
    for a in &agents {
        a.shutdown().await;
    }
    let _ = stop_tx.send(());
    drop(sims);
    println!("demo stopped; removed {}", dir.display());
    Ok(())
}
