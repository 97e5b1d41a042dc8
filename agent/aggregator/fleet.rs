//! The shell around the fleet's rules (`judge`): it loads their state from
//! the store, feeds them each persisted batch and a one-second clock, and
//! carries out what they return: stores each finding, tells watchers,
//! alerts, and updates the metrics.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use super::alert::Alerts;
use super::ingest::Live;
use super::judge::{Emit, FleetState};
use super::metrics::Metrics;
use crate::config::FleetConfig;
use crate::model::now_unix_ms;
use crate::proto::{self, event::Kind, Finding, NodeFinding};
use crate::store::central::CentralStore;
use crate::store::StoreError;

pub struct Fleet {
    state: Mutex<FleetState>,
    store: CentralStore,
    /// Replaced whole by a config reload.
    cfg: RwLock<Arc<FleetConfig>>,
    live: Arc<Live>,
    changes: broadcast::Sender<NodeFinding>,
    alerts: Alerts,
    metrics: Arc<Metrics>,
}

impl Fleet {
    fn cfg(&self) -> Arc<FleetConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A reloaded `[fleet]` table and `[[alert]]` list: thresholds apply
    /// from the next evaluation, alerts from the next finding.
    pub fn reconfigure(&self, cfg: FleetConfig, sinks: &[crate::config::AlertSinkConfig]) {
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
        self.alerts.set_sinks(sinks);
    }

    /// Builds the fleet view from what the store holds.
    pub fn load(
        store: CentralStore,
        cfg: FleetConfig,
        live: Arc<Live>,
        alerts: Alerts,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Fleet>, StoreError> {
        let mut state = FleetState::new(now_unix_ms());
        for rec in store.nodes()? {
            let head = rec.head.as_ref().map(|h| (h.height, h.hash.clone()));
            let headers = match &rec.head {
                Some(h) => {
                    let from = h.height.saturating_sub(cfg.compare_window);
                    store.headers(&rec.node_id, from, h.height)?
                }
                None => Vec::new(),
            };
            state.load_node(
                &rec.node_id,
                &rec.network,
                &rec.chain,
                head,
                headers.into_iter().map(|h| (h.height, h.hash)),
                store.findings(&rec.node_id)?,
            );
        }
        for net in state.networks() {
            for f in store.findings(&super::judge::network_scope(&net))? {
                state.load_network_finding(&net, f);
            }
        }
        alerts.resume(state.firing(), cfg.silent_after);
        let (changes, _) = broadcast::channel(1024);
        Ok(Arc::new(Fleet {
            state: Mutex::new(state),
            store,
            cfg: RwLock::new(Arc::new(cfg)),
            live,
            changes,
            alerts,
            metrics,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FleetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Findings as they open and resolve.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeFinding> {
        self.changes.subscribe()
    }

    /// Stores a finding change, tells watchers, and alerts when asked to.
    fn emit(&self, e: Emit) {
        let Emit {
            scope,
            finding: f,
            alert,
        } = e;
        if let Err(e) = self.store.put_finding(&scope, &f) {
            tracing::error!("cannot store finding {}: {e}", f.id);
        }
        tracing::info!(
            finding_kind = f.kind().label(),
            finding_id = %f.id,
            network = %f.network,
            verdict = f.verdict().label(),
            state = f.state().label(),
            cause_id = %f.cause_id,
            "{}",
            f.summary
        );
        let nf = super::judge::node_finding(&scope, f);
        let _ = self.changes.send(nf.clone());
        if alert {
            self.alerts.notify(&nf);
        }
    }

    /// Whether an agent may report under `network` and `chain`; see
    /// `FleetState::admit`.
    pub fn admit(&self, network: &str, chain: &str) -> Result<(), String> {
        let cfg = self.cfg();
        self.lock().admit(network, chain, &cfg)
    }

    /// How long an agent may send nothing before it counts as silent.
    pub fn silent_after(&self) -> Duration {
        self.cfg().silent_after
    }

    /// Events `first..=last` of `node` never arrived and no gap event
    /// covered them.
    pub fn seq_gap(&self, node: &str, network: &str, first: u64, last: u64) {
        self.emit(FleetState::seq_gap(
            node,
            network,
            first,
            last,
            now_unix_ms(),
        ));
    }

    /// A node whose agent's stream was accepted, judged from now on.
    pub fn know(&self, node: &str, network: &str, chain: &str) {
        self.lock().know(node, network, chain);
    }

    /// Takes in what one persisted batch of a node brought.
    /// A batch from `node`'s agent, which holds `pending` events after it.
    pub fn on_batch(
        &self,
        node: &str,
        network: &str,
        chain: &str,
        events: &[proto::Event],
        pending: u64,
    ) {
        for e in events {
            if let Some(Kind::Status(s)) = &e.kind {
                self.metrics.node_status(network, node, s);
            }
        }
        let window = self.cfg().compare_window;
        let emits = {
            let mut st = self.lock();
            let emits = st.on_batch(node, network, chain, events, now_unix_ms(), window);
            st.set_pending(node, pending);
            emits
        };
        for e in emits {
            self.emit(e);
        }
    }

    /// Re-judges every network; called every second.
    pub fn evaluate(&self, now: i64) {
        let started = std::time::Instant::now();
        let cfg = self.cfg();
        let ev = self.lock().evaluate(now, &cfg, self.live.as_ref());
        if let Some(ms) = ev.paused_ms {
            tracing::warn!(
                paused_ms = ms,
                "the aggregator did not run for {:.1}s; agents get fleet.silent_after from now before their silence counts",
                ms as f64 / 1000.0
            );
        }
        for (net, node, behind) in &ev.lags {
            self.metrics.lag(net, node, *behind);
        }
        for e in ev.emits {
            self.emit(e);
        }
        // The nodes whose gauges changed, copied out, so that batches need
        // not wait for the metrics.
        let (changed, open) = {
            let st = self.lock();
            let (heads, open) = st.gauges();
            let changed: Vec<(String, String, u64, bool)> = heads
                .into_iter()
                .filter_map(|(net, node, h)| {
                    let connected = self.live.connected(node);
                    self.metrics
                        .node_changed(net, node, h, connected)
                        .then(|| (net.to_string(), node.to_string(), h, connected))
                })
                .collect();
            (changed, open)
        };
        for (net, node, h, connected) in &changed {
            self.metrics.head(net, node, *h);
            self.metrics.node_connected(net, node, *connected);
        }
        self.metrics.findings_open(&open);
        self.metrics.evaluation(started.elapsed());
    }

    /// Per network: fleet head, each node's height, lag and agreement.
    pub fn view(&self, only: &str, now: i64) -> Vec<proto::NetworkView> {
        let cfg = self.cfg();
        self.lock().view(only, now, &cfg, self.live.as_ref())
    }

    /// Runs `evaluate` every second (silence and lag need a clock), on the
    /// wall clock's second: the members of an HA pair then judge the same
    /// reports at the same moments, and neither lags the other by a tick.
    pub async fn run_clock(self: Arc<Self>) {
        let mut tick = tokio::time::interval_at(
            wall_aligned(Duration::from_secs(1), Duration::ZERO),
            Duration::from_secs(1),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // It walks every node (tens of milliseconds for thousands): on a
            // blocking thread, so that the streams served by this worker
            // thread do not wait for it.
            let fleet = self.clone();
            let _ = tokio::task::spawn_blocking(move || fleet.evaluate(now_unix_ms())).await;
        }
    }

    /// A node's open findings: its agent's and the fleet's, oldest first.
    pub fn open_findings(&self, node: &str) -> Vec<Finding> {
        self.lock().open_findings(node)
    }

    /// The finding scopes of the networks (`@network`).
    pub fn network_scopes(&self) -> Vec<String> {
        self.lock().network_scopes()
    }
}

/// The next instant the wall clock is `offset` past a multiple of `every`:
/// timers that start there tick at the same wall times in every process.
pub fn wall_aligned(every: Duration, offset: Duration) -> tokio::time::Instant {
    let every_ms = every.as_millis().max(1) as i64;
    let now = now_unix_ms();
    let next = (now - offset.as_millis() as i64).div_euclid(every_ms) * every_ms
        + every_ms
        + offset.as_millis() as i64;
    tokio::time::Instant::now() + Duration::from_millis((next - now).max(0) as u64)
}
