//! Alert sinks: a generic JSON webhook, a Slack-compatible incoming webhook,
//! and the Prometheus Alertmanager v2 API. Each alert is sent once when it
//! opens and once when it resolves; a failed delivery is retried with
//! jittered exponential backoff, then logged as undeliverable.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::{AlertSinkConfig, AlertSinkKind};
use crate::model::hex;
use crate::proto::{Finding, FindingState, NodeFinding};

pub struct Alerts {
    /// One delivery task per sink; replaced whole by a config reload (the old
    /// tasks finish what they hold, then end).
    sinks: Mutex<Vec<mpsc::UnboundedSender<NodeFinding>>>,
    /// (scope, finding id, state) already queued: an alert goes out once per state.
    sent: Mutex<HashSet<(String, String, i32)>>,
}

impl Alerts {
    /// Starts one delivery task per sink (inside a tokio runtime).
    pub fn start(cfgs: &[AlertSinkConfig]) -> Alerts {
        Alerts {
            sinks: Mutex::new(spawn_sinks(cfgs)),
            sent: Mutex::new(HashSet::new()),
        }
    }

    pub fn set_sinks(&self, cfgs: &[AlertSinkConfig]) {
        *self.sinks.lock().unwrap_or_else(|p| p.into_inner()) = spawn_sinks(cfgs);
    }

    pub fn notify(&self, nf: &NodeFinding) {
        let Some(f) = &nf.finding else { return };
        let key = (nf.node_id.clone(), f.id.clone(), f.state);
        if !self
            .sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key)
        {
            return;
        }
        for sink in self.sinks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = sink.send(nf.clone());
        }
    }
}

fn spawn_sinks(cfgs: &[AlertSinkConfig]) -> Vec<mpsc::UnboundedSender<NodeFinding>> {
    cfgs.iter()
        .map(|cfg| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(deliver(cfg.clone(), rx));
            tx
        })
        .collect()
}

async fn deliver(cfg: AlertSinkConfig, mut rx: mpsc::UnboundedReceiver<NodeFinding>) {
    let http = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .build()
        .unwrap_or_default();
    let url = match cfg.kind {
        AlertSinkKind::Alertmanager => format!("{}/api/v2/alerts", cfg.url.trim_end_matches('/')),
        _ => cfg.url.clone(),
    };
    while let Some(nf) = rx.recv().await {
        let body = payload(cfg.kind, &nf);
        let mut delays = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(60))
            .with_max_times(cfg.max_attempts.saturating_sub(1) as usize)
            .build();
        let id = nf
            .finding
            .as_ref()
            .map(|f| f.id.clone())
            .unwrap_or_default();
        loop {
            let result = http.post(&url).json(&body).send().await;
            let error = match result {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => crate::error_chain(&e),
            };
            match delays.next() {
                Some(d) => {
                    tracing::warn!(sink = %cfg.url, finding_id = %id, retry_in_ms = d.as_millis() as u64, "alert delivery failed: {error}");
                    tokio::time::sleep(d).await;
                }
                None => {
                    tracing::error!(sink = %cfg.url, finding_id = %id, attempts = cfg.max_attempts, "alert undeliverable: {error}");
                    break;
                }
            }
        }
    }
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn subject(nf: &NodeFinding, f: &Finding) -> String {
    if nf.node_id.is_empty() {
        format!("network {}", f.network)
    } else {
        format!("{} ({})", nf.node_id, f.network)
    }
}

pub fn payload(kind: AlertSinkKind, nf: &NodeFinding) -> Value {
    let Some(f) = &nf.finding else {
        return Value::Null;
    };
    match kind {
        AlertSinkKind::Webhook => {
            let mut v = crate::operator::finding_json(f);
            v["node_id"] = json!(nf.node_id);
            v
        }
        AlertSinkKind::Slack => {
            let (mark, word) = match f.state() {
                FindingState::Resolved => (":white_check_mark:", "RESOLVED"),
                FindingState::Occurred => (":warning:", "OCCURRED"),
                _ => (":rotating_light:", "FIRING"),
            };
            json!({
                "text": format!(
                    "{mark} [{word}] {} {} on {}: {}\nwhose fault: {} ({})",
                    f.severity().label(),
                    f.kind().label(),
                    subject(nf, f),
                    f.summary,
                    f.verdict().label(),
                    f.verdict_reason
                )
            })
        }
        AlertSinkKind::Alertmanager => {
            let mut alert = json!({
                "labels": {
                    "alertname": format!("outpost_{}", f.kind().label().replace('-', "_")),
                    "kind": f.kind().label(),
                    "severity": f.severity().label(),
                    "verdict": f.verdict().label(),
                    "network": f.network,
                    "node": nf.node_id,
                    "finding_id": f.id,
                },
                "annotations": {
                    "summary": f.summary,
                    "verdict_reason": f.verdict_reason,
                },
                "startsAt": rfc3339(f.opened_at_unix_ms),
                "generatorURL": format!("outpost://aggregator/findings/{}", f.id),
            });
            match f.state() {
                FindingState::Resolved => alert["endsAt"] = json!(rfc3339(f.resolved_at_unix_ms)),
                // Something that happened once fires for five minutes.
                FindingState::Occurred => {
                    alert["endsAt"] = json!(rfc3339(f.opened_at_unix_ms + 300_000))
                }
                _ => {}
            }
            if !f.groups.is_empty() {
                let groups: Vec<String> = f
                    .groups
                    .iter()
                    .map(|g| format!("{}: {}", hex(&g.hash), g.node_ids.join(",")))
                    .collect();
                alert["annotations"]["groups"] = json!(groups.join("; "));
            }
            json!([alert])
        }
    }
}
