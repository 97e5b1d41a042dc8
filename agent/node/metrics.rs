//! The agent's own `/metrics`, `/healthz` and `/readyz`, on the listener
//! `[metrics] listen` names (off by default): what an operator asks of the
//! agent beside the node without going through an aggregator. The poll
//! figures are recorded as polls end; the store's figures are read at each
//! scrape.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::health::Check;
use crate::store::local::{Delivery, LocalStore};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AggregatorLabels {
    aggregator: String,
}

pub struct AgentMetrics {
    registry: Registry,
    poll_seconds: Histogram,
    poll_failures: Counter,
    breaker_open: Gauge,
    head_height: Gauge,
    last_seq: Gauge,
    outbox_bytes: Gauge,
    outbox_quota: Gauge,
    outbox_events: Gauge,
    dropped: Gauge,
    connected: Family<AggregatorLabels, Gauge>,
    backlog: Family<AggregatorLabels, Gauge>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut m = AgentMetrics {
            registry: Registry::with_prefix("outpost_agent"),
            // 1 ms to about 16 s: a poll on loopback to one stuck on a timeout.
            poll_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            poll_failures: Counter::default(),
            breaker_open: Gauge::default(),
            head_height: Gauge::default(),
            last_seq: Gauge::default(),
            outbox_bytes: Gauge::default(),
            outbox_quota: Gauge::default(),
            outbox_events: Gauge::default(),
            dropped: Gauge::default(),
            connected: Family::default(),
            backlog: Family::default(),
        };
        m.registry.register(
            "poll_duration_seconds",
            "One poll of the node, from the first request until its observation is committed",
            m.poll_seconds.clone(),
        );
        m.registry.register(
            "poll_failures",
            "Polls that failed (the node did not answer, or answered wrongly)",
            m.poll_failures.clone(),
        );
        m.registry.register(
            "breaker_open",
            "1 while the circuit breaker is open: the node is unreachable and polled at the back-off interval",
            m.breaker_open.clone(),
        );
        m.registry.register(
            "head_height",
            "Height of the newest header the agent stored",
            m.head_height.clone(),
        );
        m.registry.register(
            "last_seq",
            "The highest event seq the agent assigned",
            m.last_seq.clone(),
        );
        m.registry.register(
            "outbox_bytes",
            "Bytes of events in the outbox, not yet held by every aggregator",
            m.outbox_bytes.clone(),
        );
        m.registry.register(
            "outbox_quota_bytes",
            "store.outbox_quota_bytes: above it the oldest events are dropped",
            m.outbox_quota.clone(),
        );
        m.registry.register(
            "outbox_events",
            "Events not yet held by every aggregator",
            m.outbox_events.clone(),
        );
        m.registry.register(
            "dropped_events",
            "Events the outbox quota dropped since the store was created",
            m.dropped.clone(),
        );
        m.registry.register(
            "aggregator_connected",
            "1 while the stream to this aggregator is up",
            m.connected.clone(),
        );
        m.registry.register(
            "aggregator_backlog_events",
            "Events this aggregator does not hold yet",
            m.backlog.clone(),
        );
        m
    }

    /// One poll that ended after `took`; `failed` when it did not succeed.
    pub fn poll(&self, took: Duration, failed: bool) {
        self.poll_seconds.observe(took.as_secs_f64());
        if failed {
            self.poll_failures.inc();
        }
    }

    pub fn breaker(&self, open: bool) {
        self.breaker_open.set(i64::from(open));
    }

    /// The metrics text, with the store's figures read now.
    pub fn encode(&self, store: &LocalStore) -> String {
        let last = store.last_seq();
        if let Ok(Some(h)) = store.head() {
            self.head_height.set(h.height as i64);
        }
        self.last_seq.set(last as i64);
        self.outbox_bytes.set(store.outbox_bytes() as i64);
        self.outbox_quota.set(store.quota_bytes() as i64);
        self.dropped.set(store.dropped_events() as i64);
        let deliveries = store.deliveries();
        let held = deliveries.iter().map(|d| d.acked).min().unwrap_or(last);
        self.outbox_events.set(last.saturating_sub(held) as i64);
        for d in &deliveries {
            let l = AggregatorLabels {
                aggregator: d.aggregator.clone(),
            };
            self.connected.get_or_create(&l).set(i64::from(d.connected));
            self.backlog
                .get_or_create(&l)
                .set(last.saturating_sub(d.acked) as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// What the agent's readiness depends on, read at one moment.
#[derive(Clone)]
pub struct Readiness<'a> {
    /// Err with the reason when a read of the store failed.
    pub store: Result<(), String>,
    pub free_bytes: Option<u64>,
    pub min_free_bytes: u64,
    pub deliveries: &'a [Delivery],
    pub outbox_bytes: u64,
    pub quota_bytes: u64,
    /// Every actor answered a ping in time.
    pub actors: bool,
}

/// `/readyz` for an agent: its store answers with room left, it is
/// connected to at least one aggregator or buffering within its quota, and
/// its actors answer.
pub fn checks(r: &Readiness<'_>) -> Vec<Check> {
    let store = match (&r.store, r.free_bytes) {
        (Err(e), _) => Check::failed("store", format!("a read failed: {e}")),
        (Ok(()), Some(free)) if free < r.min_free_bytes => Check::failed(
            "store",
            format!(
                "{free} bytes free, under store.min_free_bytes ({}): the node is no longer polled",
                r.min_free_bytes
            ),
        ),
        (Ok(()), Some(free)) => Check::ok("store", format!("open, {} MiB free", free >> 20)),
        (Ok(()), None) => Check::ok("store", "open"),
    };
    let up: Vec<&str> = r
        .deliveries
        .iter()
        .filter(|d| d.connected)
        .map(|d| d.aggregator.as_str())
        .collect();
    let buffering = format!(
        "{} of {} outbox bytes (store.outbox_quota_bytes)",
        r.outbox_bytes, r.quota_bytes
    );
    let report = if !up.is_empty() {
        Check::ok("report", format!("connected to {}", up.join(", ")))
    } else if r.outbox_bytes < r.quota_bytes {
        Check::ok(
            "report",
            format!("no aggregator connected; buffering {buffering}"),
        )
    } else {
        Check::failed(
            "report",
            format!("no aggregator connected and the outbox is full, {buffering}: the oldest events are dropped"),
        )
    };
    let actors = if r.actors {
        Check::ok("actors", "every actor answers")
    } else {
        Check::failed("actors", "an actor did not answer within 2 s")
    };
    vec![store, report, actors]
}

/// Serves the agent's listener until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<AgentMetrics>,
    store: LocalStore,
    min_free_bytes: u64,
    actors: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync
        + 'static,
) {
    let text_store = store.clone();
    let text: crate::health::MetricsText = Arc::new(move || metrics.encode(&text_store));
    let actors = Arc::new(actors);
    let ready: crate::health::ReadyChecks = Arc::new(move || {
        let (store, actors) = (store.clone(), actors.clone());
        Box::pin(async move {
            let answered = actors().await;
            let deliveries = store.deliveries();
            checks(&Readiness {
                store: store.head().map(|_| ()).map_err(|e| e.to_string()),
                free_bytes: store.free_bytes(),
                min_free_bytes,
                deliveries: &deliveries,
                outbox_bytes: store.outbox_bytes(),
                quota_bytes: store.quota_bytes(),
                actors: answered,
            })
        })
    });
    crate::health::serve(listener, text, ready, None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(name: &str, acked: u64, connected: bool) -> Delivery {
        Delivery {
            aggregator: name.into(),
            acked,
            connected,
        }
    }

    /// A store with room, an empty outbox of quota 100, every actor up.
    fn healthy(deliveries: &[Delivery]) -> Readiness<'_> {
        Readiness {
            store: Ok(()),
            free_bytes: Some(1 << 30),
            min_free_bytes: 16 << 20,
            deliveries,
            outbox_bytes: 0,
            quota_bytes: 100,
            actors: true,
        }
    }

    fn ready(r: &Readiness<'_>) -> (bool, Vec<Check>) {
        let c = checks(r);
        (c.iter().all(|c| c.ok), c)
    }

    #[test]
    fn ready_while_connected_or_buffering_within_quota() {
        let both = [
            delivery("https://a", 9, true),
            delivery("https://b", 3, false),
        ];
        let base = Readiness {
            outbox_bytes: 10,
            ..healthy(&both)
        };
        let (ok, c) = ready(&base);
        assert!(ok, "{c:?}");
        assert_eq!(c[1].detail, "connected to https://a");

        let down = [delivery("https://a", 9, false)];
        let (ok, c) = ready(&Readiness {
            deliveries: &down,
            ..base.clone()
        });
        assert!(ok, "{c:?}");
        assert!(c[1].detail.contains("buffering 10 of 100"), "{c:?}");

        let (ok, c) = ready(&Readiness {
            deliveries: &down,
            outbox_bytes: 100,
            ..base.clone()
        });
        assert!(!ok);
        assert!(!c[1].ok && c[1].detail.contains("outbox is full"), "{c:?}");
    }

    #[test]
    fn not_ready_when_the_store_or_an_actor_fails() {
        let up = [delivery("https://a", 9, true)];
        let base = healthy(&up);
        let (ok, c) = ready(&Readiness {
            free_bytes: Some(1 << 20),
            ..base.clone()
        });
        assert!(!ok && !c[0].ok, "{c:?}");
        assert!(c[0].detail.contains("store.min_free_bytes"));
        let (ok, c) = ready(&Readiness {
            store: Err("io error".into()),
            ..base.clone()
        });
        assert!(!ok && c[0].detail.contains("io error"), "{c:?}");
        let (ok, c) = ready(&Readiness {
            actors: false,
            ..base.clone()
        });
        assert!(!ok && !c[2].ok, "{c:?}");
    }

    #[test]
    fn exports_poll_outbox_breaker_and_aggregator_series() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(
            dir.path(),
            1 << 20,
            crate::store::Durability::ProcessCrash,
            1 << 20,
        )
        .unwrap();
        store.deliver_to(&["https://agg-a:7443".into()]);
        let m = AgentMetrics::new();
        m.poll(Duration::from_millis(3), false);
        m.poll(Duration::from_millis(5), true);
        m.breaker(true);
        let text = m.encode(&store);
        for want in [
            "outpost_agent_poll_duration_seconds_count 2",
            "outpost_agent_poll_failures_total 1",
            "outpost_agent_breaker_open 1",
            "outpost_agent_outbox_bytes 0",
            "outpost_agent_outbox_quota_bytes 1048576",
            "outpost_agent_aggregator_connected{aggregator=\"https://agg-a:7443\"} 0",
            "outpost_agent_aggregator_backlog_events{aggregator=\"https://agg-a:7443\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
