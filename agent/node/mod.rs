//! Agent mode: the actors beside one chain node, and their wiring.
//!
//! Data flows Ingest → Validate → store (outbox) → Report → aggregator.
//! Each actor runs under an actix Supervisor. Handlers never panic (the
//! binary aborts on panic and systemd restarts it); an actor that hits an
//! error it cannot handle stops itself and its supervisor restarts it.

pub mod admin;
pub mod breaker;
pub mod host;
pub mod ingest;
pub mod judge;
pub mod metrics;
pub mod report;
pub mod snapshot;
pub mod subscribe;
pub mod validate;
pub mod writer;

use std::time::Duration;

use actix::prelude::*;

use crate::config::AgentConfig;
use crate::latency::Timings;
use crate::reload;
use crate::service::{self, Signal, Signals};
use crate::store::local::LocalStore;
use crate::tls::Identity;
use host::HostProbe;
use ingest::{Ingest, Walk};
use report::Report;
use snapshot::Snapshots;
use validate::Validate;

/// Liveness probe: an actor that answers is processing its mailbox.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ping;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("report.cert: {0}")]
    Identity(String),
    #[error("{0}")]
    Unrecoverable(String),
    #[error("{0}")]
    Source(String),
}

/// Config keys a reload applies without a restart (tables cover every key
/// under them). Everything else is named in the log as needing a restart.
pub const LIVE_KEYS: &[&str] = &[
    "source.poll_interval",
    "source.status_interval",
    "source.breaker_failures",
    "source.backoff_max",
    "source.max_headers_per_poll",
    "validate",
    "store.retain_headers",
    "host",
    "snapshot.interval",
    "snapshot.keep",
    "snapshot.max_age",
];

/// A running agent.
pub struct Agent {
    pub node_id: String,
    pub store: LocalStore,
    /// What the agent's own listener serves (`[metrics] listen`).
    pub metrics: std::sync::Arc<metrics::AgentMetrics>,
    actors: Actors,
    /// Set when the agent must not go on (the node is on the wrong network).
    fatal: tokio::sync::watch::Receiver<Option<String>>,
}

/// The addresses of one agent's actors.
#[derive(Clone)]
struct Actors {
    ingest: Addr<Ingest>,
    validate: Addr<Validate>,
    report: Addr<Report>,
    snapshots: Addr<Snapshots>,
    host: Addr<HostProbe>,
}

impl Actors {
    /// True when every actor answers a ping within `timeout`.
    async fn healthy(&self, timeout: Duration) -> bool {
        let ok = |r: Result<Result<(), MailboxError>, _>| matches!(r, Ok(Ok(())));
        ok(tokio::time::timeout(timeout, self.ingest.send(Ping)).await)
            && ok(tokio::time::timeout(timeout, self.validate.send(Ping)).await)
            && ok(tokio::time::timeout(timeout, self.report.send(Ping)).await)
            && ok(tokio::time::timeout(timeout, self.snapshots.send(Ping)).await)
            && ok(tokio::time::timeout(timeout, self.host.send(Ping)).await)
    }
}

impl Agent {
    /// Opens the store and starts the actors. Call inside a running actix System.
    pub fn start(cfg: &AgentConfig) -> Result<Agent, AgentError> {
        match cfg.report.tls().own_identity() {
            Ok(Some(Identity::Agent(id))) if id == cfg.node_id => {}
            Ok(Some(other)) => {
                return Err(AgentError::Identity(format!(
                    "certificate is for {other}, but node_id is {:?}",
                    cfg.node_id
                )))
            }
            Ok(None) => {
                return Err(AgentError::Identity(
                    "not an Outpost agent certificate".into(),
                ))
            }
            Err(e) => return Err(AgentError::Identity(e.to_string())),
        }
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            crate::store::StoreError::CreateDir {
                path: cfg.data_dir.clone(),
                source: e,
            }
        })?;
        let (store, recovered) = open_or_recover(cfg)?;
        if let Some(t) = crate::tls::pem_not_after(&cfg.report.cert) {
            let now = crate::model::now_unix_ms() / 1000;
            crate::tls::log_expiry("this agent's certificate", &cfg.report.cert, t, now);
        }
        // The witness names this run's marker from the start: a snapshot
        // taken before the aggregator is reached carries it too.
        if let Err(e) = store.write_witness() {
            tracing::warn!(node_id = %cfg.node_id, "store witness not written: {e}");
        }
        let timings = Timings::default();
        let source =
            crate::chain::build(&cfg.source, timings.rpc.clone()).map_err(AgentError::Source)?;
        if cfg.source.ws_url.is_some() && source.head_subscription().is_none() {
            return Err(AgentError::Source(format!(
                "source.ws_url: the {} source has no head subscription; drop ws_url",
                source.chain()
            )));
        }
        let round_trip = timings.round_trip.clone();
        let chain = source.chain();
        let span = |actor: &'static str| {
            // Error level keeps the span (and NODE_ID, CHAIN, ACTOR) on every line at any log filter.
            tracing::error_span!("agent", node_id = %cfg.node_id, chain, actor)
        };
        tracing::info!(
            node_id = %cfg.node_id,
            chain,
            last_seq = store.last_seq(),
            outbox_bytes = store.outbox_bytes(),
            data_dir = %cfg.data_dir.display(),
            "agent starting"
        );

        let (fatal_tx, fatal) = tokio::sync::watch::channel(None);
        let (vstore, checks, vcfg, retain, vspan, hcfg) = (
            store.clone(),
            source.clone(),
            cfg.validate.clone(),
            cfg.store.retain_headers,
            span("validate"),
            cfg.host.clone(),
        );
        let (min_free, vfatal) = (cfg.store.min_free_bytes, fatal_tx.clone());
        let poll_interval = cfg.source.poll_interval;
        let validate = Supervisor::start(move |_| {
            Validate::new(vstore, checks, vcfg, retain, timings, vspan)
                .host(hcfg)
                .poll_interval(poll_interval)
                .recovered(recovered)
                .disk(min_free, vfatal)
        });
        let (hcfg, hdir, v, hspan) = (
            cfg.host.clone(),
            cfg.data_dir.clone(),
            validate.clone(),
            span("host"),
        );
        let host = Supervisor::start(move |_| HostProbe::new(hcfg, hdir, v, hspan));
        let (v, snapcfg, snapdir, id, sspan) = (
            validate.clone(),
            cfg.snapshot.clone(),
            cfg.snapshot_dir(),
            cfg.node_id.clone(),
            span("snapshot"),
        );
        let snapshots = Supervisor::start(move |_| Snapshots::new(v, snapcfg, snapdir, id, sspan));

        let observed = std::sync::Arc::new(metrics::AgentMetrics::new());
        let (istore, scfg, depth, ispan, v, iobserved) = (
            store.clone(),
            cfg.source.clone(),
            Walk::of(&cfg.validate),
            span("ingest"),
            validate.clone(),
            observed.clone(),
        );
        let ingest = Supervisor::start(move |_| {
            Ingest::new(source, istore, v, scfg, depth, ispan, fatal_tx).observed(iobserved)
        });

        let me = report::Identity {
            node_id: cfg.node_id.clone(),
            network: cfg.network.clone(),
            chain: chain.to_string(),
        };
        let (rstore, rcfg, rspan) = (store.clone(), cfg.report.clone(), span("report"));
        let report = Supervisor::start(move |_| Report::new(rcfg, me, rstore, round_trip, rspan));

        Ok(Agent {
            node_id: cfg.node_id.clone(),
            store,
            metrics: observed,
            actors: Actors {
                ingest,
                validate,
                report,
                snapshots,
                host,
            },
            fatal,
        })
    }

    pub async fn healthy(&self, timeout: Duration) -> bool {
        self.actors.healthy(timeout).await
    }

    /// Hands the live part of a reloaded config to the actors.
    pub async fn reconfigure(&self, cfg: &AgentConfig) {
        let _ = self
            .actors
            .ingest
            .send(ingest::Reconfigure {
                source: cfg.source.clone(),
                walk: Walk::of(&cfg.validate),
            })
            .await;
        let _ = self
            .actors
            .validate
            .send(validate::Reconfigure {
                cfg: cfg.validate.clone(),
                retain_headers: cfg.store.retain_headers,
                host: cfg.host.clone(),
                poll_interval: cfg.source.poll_interval,
            })
            .await;
        let _ = self
            .actors
            .host
            .send(host::Reconfigure(cfg.host.clone()))
            .await;
        let _ = self
            .actors
            .snapshots
            .send(snapshot::Reconfigure(cfg.snapshot.clone()))
            .await;
    }

    /// Stops polling, makes the store durable and closes the stream.
    pub async fn shutdown(&self) {
        let _ = self.actors.ingest.send(ingest::StopPolling).await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(node_id = %self.node_id, "final flush failed: {e}");
        }
        let _ = self.actors.report.send(report::Shutdown).await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(node_id = %self.node_id, "final flush failed: {e}");
        } else if let Err(e) = self.store.write_witness() {
            tracing::warn!(node_id = %self.node_id, "store witness not written: {e}");
        }
    }
}

/// Opens the store and checks it. A store that will not open or fails its
/// check is moved aside and replaced by the newest snapshot that verifies;
/// the second value is then the summary of the `store-recovered` finding.
fn open_or_recover(cfg: &AgentConfig) -> Result<(LocalStore, Option<String>), AgentError> {
    let open = || {
        let s = LocalStore::open(
            &cfg.data_dir,
            cfg.store.cache_bytes,
            cfg.store.durability,
            cfg.store.outbox_quota_bytes,
        )?;
        s.check()?;
        Ok::<_, crate::store::StoreError>(s)
    };
    let witness = LocalStore::witness(&cfg.data_dir).map(|w| w.durable);
    // The store's last seq when it opens but holds less than its witness.
    let (broken, kept_seq) = match open() {
        Ok(s) => match witness.filter(|w| s.last_seq() < *w) {
            None => return Ok((s, None)),
            Some(w) => (
                format!(
                    "it holds events up to seq {}, but had reached seq {w}: sled dropped a damaged part of its log",
                    s.last_seq()
                ),
                Some(s.last_seq()),
            ),
        },
        Err(e) if e.is_in_use() => return Err(e.into()),
        Err(e) => (e.to_string(), None),
    };
    let dir = cfg.snapshot_dir();
    let unrecoverable = |why: String| {
        AgentError::Unrecoverable(format!(
            "the store at {} is unusable ({broken}) and {why}; move it aside to start with an empty store",
            cfg.data_dir.display()
        ))
    };
    let (newest, skipped) = crate::store::snapshot::newest_valid(&dir, &cfg.node_id)
        .map_err(|e| unrecoverable(format!("the snapshots cannot be read: {e}")))?;
    for s in &skipped {
        tracing::warn!("snapshot passed over: {s}");
    }
    let newest = newest.filter(|(_, m)| kept_seq.is_none_or(|k| m.last_seq.unwrap_or(0) > k));
    let Some((snap, manifest)) = newest else {
        if let Some(kept) = kept_seq {
            // The store opens and no snapshot holds more: go on with it.
            let summary = format!(
                "store at {}: {broken}; no snapshot in {} holds more, so the store is kept as it is (last seq {kept})",
                cfg.data_dir.display(),
                dir.display()
            );
            tracing::error!(node_id = %cfg.node_id, "{summary}");
            return Ok((open()?, Some(summary)));
        }
        return Err(unrecoverable(format!(
            "no snapshot of {} in {} verifies",
            cfg.node_id,
            dir.display()
        )));
    };
    let (_, aside) = crate::store::snapshot::restore(&snap, &cfg.data_dir, true)
        .map_err(|e| unrecoverable(format!("restoring {} failed: {e}", snap.display())))?;
    let aside = aside.map_or("-".into(), |a| a.display().to_string());
    let summary = format!(
        "store at {} was unusable ({broken}); moved it to {aside} and restored {} (last seq {}, head {}); later events are re-read from the node",
        cfg.data_dir.display(),
        snap.display(),
        manifest.last_seq.unwrap_or(0),
        manifest.head_height.map_or("-".into(), |h| h.to_string()),
    );
    tracing::error!(
        node_id = %cfg.node_id,
        broken_store = %aside,
        snapshot = %snap.display(),
        "{summary}"
    );
    Ok((open()?, Some(summary)))
}

/// Re-reads the config file on SIGHUP. A config that fails validation is
/// refused and the running one stays in force.
struct Reloader {
    path: std::path::PathBuf,
    started: AgentConfig,
    loaded: AgentConfig,
}

impl Reloader {
    async fn reload(&mut self, agent: &Agent) {
        let new = match crate::config::load_agent(&self.path) {
            Ok(new) => new,
            Err(e) => {
                reload::log_refused(&e);
                return;
            }
        };
        let plan = reload::plan(&self.started, &self.loaded, &new, LIVE_KEYS);
        agent.reconfigure(&new).await;
        reload::log_plan(&self.path, &plan);
        self.loaded = new;
    }
}

/// `outpost agent`: runs until SIGTERM or SIGINT; SIGHUP reloads the config
/// at `path`.
pub async fn run(cfg: AgentConfig, path: &std::path::Path) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    // Bound before the actors start, so that a taken port stops the agent
    // with a message instead of leaving it running unobserved.
    let listener = match cfg.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics.listen: cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    let agent = Agent::start(&cfg)?;
    if let Some(l) = listener {
        tracing::info!(address = %l.local_addr()?, "agent metrics listening");
        let actors = agent.actors.clone();
        tokio::spawn(metrics::serve(
            l,
            agent.metrics.clone(),
            agent.store.clone(),
            cfg.store.min_free_bytes,
            move || {
                let actors = actors.clone();
                Box::pin(async move { actors.healthy(Duration::from_secs(2)).await })
            },
        ));
    }
    match admin::serve(&cfg.data_dir, agent.actors.snapshots.clone()) {
        Ok(path) => tracing::info!(socket = %path.display(), "admin endpoint listening"),
        Err(e) => tracing::warn!(
            "admin endpoint unavailable at {}: {e}",
            admin::socket_path(&cfg.data_dir).display()
        ),
    }
    let mut reloader = Reloader {
        path: path.to_path_buf(),
        started: cfg.clone(),
        loaded: cfg.clone(),
    };
    service::notify_ready();
    service::notify_status(&format!("monitoring {} as {}", cfg.source.url, cfg.node_id));
    if let Some(every) = service::watchdog_interval() {
        let probe = agent.actors.clone();
        actix::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if probe.healthy(every).await {
                    service::notify_watchdog();
                } else {
                    tracing::error!("an actor did not answer; withholding the watchdog ping");
                }
            }
        });
    }
    let mut fatal = agent.fatal.clone();
    let fatal_error = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop(name) => {
                    tracing::info!("{name} received; shutting down");
                    break None;
                }
                Signal::Reload => {
                    service::notify(&[("RELOADING", "1")]);
                    reloader.reload(&agent).await;
                    service::notify_ready();
                }
            },
            msg = fatal.wait_for(Option::is_some) => break msg.ok().and_then(|m| m.clone()),
        }
    };
    service::notify_stopping();
    agent.shutdown().await;
    match fatal_error {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => {
            tracing::info!("agent stopped cleanly");
            Ok(())
        }
    }
}
