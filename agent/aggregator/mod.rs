//! Aggregator mode: the fleet's side of the delivery stream and the operator
//! query API, over one mutual-TLS gRPC listener.

pub mod alert;
pub mod auth;
pub mod email;
pub mod fleet;
pub mod ingest;
pub mod judge;
pub mod listen;
pub mod metrics;
pub mod page;
pub mod query;
pub mod ratelimit;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::config::AggregatorConfig;
use crate::proto::{ingest_server::IngestServer, query_server::QueryServer};
use crate::reload;
use crate::service::{self, Signal, Signals};
use crate::store::central::CentralStore;
use alert::Alerts;
use fleet::Fleet;
use ingest::{IngestService, Live};
use metrics::Metrics;
use query::QueryService;

/// Largest query answer: a fleet's node list or findings can be large.
const MAX_QUERY_ANSWER_BYTES: usize = 64 << 20;

pub use crate::wire::FILE_DESCRIPTOR_SET;

/// A bound, not yet serving aggregator.
pub struct Aggregator {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    cfg: AggregatorConfig,
    store: CentralStore,
}

impl Aggregator {
    /// Opens the store and binds the listener (inside a tokio runtime).
    pub async fn bind(cfg: AggregatorConfig) -> anyhow::Result<Aggregator> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
        let store = CentralStore::open(&cfg.data_dir, cfg.store.cache_bytes, cfg.store.durability)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let metrics_listener = if cfg.metrics.enabled {
            Some(
                TcpListener::bind(cfg.metrics.listen)
                    .await
                    .with_context(|| {
                        format!("metrics.listen: cannot listen on {}", cfg.metrics.listen)
                    })?,
            )
        } else {
            None
        };
        Ok(Aggregator {
            listener,
            metrics_listener,
            cfg,
            store,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (_keep, reloads) = tokio::sync::watch::channel(self.cfg.clone());
        self.serve_with_reload(shutdown, reloads).await
    }

    /// Serves until `shutdown` resolves; each config sent on `reloads` has its
    /// live part (`[fleet]`, `[[alert]]`) applied.
    pub async fn serve_with_reload(
        self,
        shutdown: impl Future<Output = ()>,
        mut reloads: tokio::sync::watch::Receiver<AggregatorConfig>,
    ) -> anyhow::Result<()> {
        let snapshot_cfg = reloads.clone();
        let live = Arc::new(Live::default());
        let metrics = Arc::new(Metrics::new(&self.cfg.metrics.labels));
        let gate = listen::Gate::new(
            self.cfg.tls.clone(),
            self.cfg.limits.clone(),
            metrics.clone(),
        )
        .context("TLS configuration")?;
        let alerts = Alerts::start(&self.cfg.alerts);
        let fleet = Fleet::load(
            self.store.clone(),
            self.cfg.fleet.clone(),
            live.clone(),
            alerts,
            metrics.clone(),
        )?;
        tokio::spawn(fleet.clone().run_clock());
        let (daily, files) = (gate.clone(), self.cfg.tls.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(86_400));
            tick.tick().await;
            loop {
                tick.tick().await;
                daily.check_own(&files);
            }
        });
        let (reloaded, reload_gate, reload_live) = (fleet.clone(), gate.clone(), live.clone());
        tokio::spawn(async move {
            while reloads.changed().await.is_ok() {
                let cfg = reloads.borrow_and_update().clone();
                reloaded.reconfigure(cfg.fleet, &cfg.alerts);
                // The certificate, key, CA and revocation list are re-read,
                // from the paths the new config names.
                match reload_gate.reload(&cfg.tls) {
                    Ok(()) => tracing::info!("TLS files reloaded; connections kept"),
                    Err(e) => {
                        tracing::error!("TLS files not reloaded, the ones in force stay: {e}");
                        continue;
                    }
                }
                // Streams already open on a certificate now revoked end.
                if let Some(crl) = &cfg.tls.crl {
                    match crate::tls::revoked_serials(crl) {
                        Ok(serials) => {
                            for node in reload_live.end_revoked(&serials) {
                                tracing::warn!(target: auth::AUDIT, node_id = %node, "ending the stream of {node}: its certificate is revoked");
                            }
                        }
                        Err(e) => tracing::error!("revocation list not read for open streams: {e}"),
                    }
                }
            }
        });
        if let Some(l) = self.metrics_listener {
            let (store, listener, min_free) = (
                self.store.clone(),
                gate.clone(),
                self.cfg.store.min_free_bytes,
            );
            let ready =
                crate::health::ready_now(move || vec![store.check(min_free), listener.check()]);
            let text = metrics.clone();
            let page = page::Feed::start(fleet.clone());
            tokio::spawn(crate::health::serve(
                l,
                Arc::new(move || text.encode()),
                ready,
                Some(page.pages()),
            ));
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("reflection service")?;
        tokio::spawn(prune_event_log(
            self.store.clone(),
            self.cfg.store.event_log_keep,
        ));
        tokio::spawn(scheduled_snapshots(
            self.store.clone(),
            self.cfg.snapshot.dir_for(&self.cfg.data_dir),
            snapshot_cfg,
        ));
        let (query_limits, query_metrics) = (
            Arc::new(ratelimit::QueryLimits::new(&self.cfg.limits)),
            metrics.clone(),
        );
        let idle = query_limits.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                idle.forget_idle();
            }
        });
        Server::builder()
            .max_concurrent_streams(Some(self.cfg.limits.max_streams_per_connection))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(
                IngestServer::new(
                    IngestService::new(self.store.clone(), live.clone(), fleet.clone(), metrics)
                        .min_free(self.cfg.store.min_free_bytes),
                )
                .max_decoding_message_size(crate::wire::MAX_MESSAGE_BYTES),
            )
            .add_service(tonic::service::interceptor::InterceptedService::new(
                QueryServer::new(
                    QueryService::new(self.store.clone(), live, fleet)
                        .limited(query_limits, query_metrics),
                )
                .max_encoding_message_size(MAX_QUERY_ANSWER_BYTES),
                auth::operator_only,
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                reflection,
                auth::operator_only,
            ))
            .serve_with_incoming_shutdown(gate.incoming(self.listener), shutdown)
            .await
            .context("gRPC server")?;
        Ok(())
    }
}

async fn prune_event_log(store: CentralStore, keep: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let Ok(nodes) = store.nodes() else { continue };
        for rec in nodes {
            if let Err(e) = store.prune_events(&rec.node_id, rec.last_seq, keep) {
                tracing::warn!(node_id = %rec.node_id, "event log retention failed: {e}");
            }
        }
    }
}

/// Writes a snapshot of the store every `snapshot.interval`, then applies
/// retention; the interval and retention follow reloads.
async fn scheduled_snapshots(
    store: CentralStore,
    dir: PathBuf,
    mut reloads: tokio::sync::watch::Receiver<AggregatorConfig>,
) {
    use crate::store::snapshot;
    snapshot::remove_partial(&dir);
    loop {
        let cfg = reloads.borrow_and_update().snapshot.clone();
        if cfg.interval.is_zero() {
            if reloads.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        let (s, d) = (store.clone(), dir.clone());
        let started = std::time::Instant::now();
        let written = tokio::task::spawn_blocking(move || s.snapshot(&d))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match written {
            Ok(w) => tracing::info!(
                file = %w.path.display(),
                bytes = w.bytes,
                ms = started.elapsed().as_millis() as u64,
                "snapshot written"
            ),
            Err(e) => {
                tracing::error!("snapshot failed: {e}");
                continue;
            }
        }
        snapshot::prune_logged(dir.clone(), "aggregator", None, cfg.keep, cfg.max_age).await;
    }
}

/// Config keys a reload applies without a restart.
pub const LIVE_KEYS: &[&str] = &[
    "fleet",
    "alert",
    "tls",
    "snapshot.interval",
    "snapshot.keep",
    "snapshot.max_age",
];

/// `outpost aggregator`: serves until SIGTERM or SIGINT; SIGHUP reloads the
/// config at `path`.
pub async fn run(cfg: AggregatorConfig, path: &Path) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    let (reload_tx, reloads) = tokio::sync::watch::channel(cfg.clone());
    let started = cfg.clone();
    let agg = Aggregator::bind(cfg).await?;
    tracing::info!(listen = %agg.local_addr()?, metrics = ?agg.metrics_addr(), "aggregator listening");
    service::notify_ready();
    if let Some(every) = service::watchdog_interval() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                service::notify_watchdog();
            }
        });
    }
    let path = path.to_path_buf();
    agg.serve_with_reload(
        async move {
            loop {
                match signals.next().await {
                    Signal::Stop(name) => {
                        tracing::info!("{name} received; shutting down");
                        break;
                    }
                    Signal::Reload => match crate::config::load_aggregator(&path) {
                        Ok(new) => {
                            let plan = reload::plan(&started, &reload_tx.borrow(), &new, LIVE_KEYS);
                            reload::log_plan(&path, &plan);
                            reload_tx.send_replace(new);
                        }
                        Err(e) => reload::log_refused(&e),
                    },
                }
            }
            service::notify_stopping();
        },
        reloads,
    )
    .await
}
