//! Alert sinks: a generic JSON webhook, a Slack-compatible incoming webhook,
//! the Prometheus Alertmanager v2 API, and e-mail. Each alert is sent once when it
//! opens and once when it resolves; a failed delivery is retried with
//! jittered exponential backoff, then logged as undeliverable. Alertmanager
//! also gets every open alert again each `resend`, as Prometheus posts its
//! firing alerts: Alertmanager resolves an alert nobody posts again, and in
//! an HA pair either member keeps it firing.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
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
    /// Open alerts by (scope, finding id), for the Alertmanager resends.
    firing: Firing,
}

/// Open alerts, each with the time before which it is not posted again
/// (a restart's alerts wait until the agents had time to report what
/// changed while the aggregator was down).
type Firing = Arc<Mutex<BTreeMap<(String, String), (NodeFinding, Option<std::time::Instant>)>>>;

impl Alerts {
    /// Starts one delivery task per sink (inside a tokio runtime).
    pub fn start(cfgs: &[AlertSinkConfig]) -> Alerts {
        let firing = Firing::default();
        Alerts {
            sinks: Mutex::new(spawn_sinks(cfgs, &firing)),
            sent: Mutex::new(HashSet::new()),
            firing,
        }
    }

    pub fn set_sinks(&self, cfgs: &[AlertSinkConfig]) {
        *self.sinks.lock().unwrap_or_else(|p| p.into_inner()) = spawn_sinks(cfgs, &self.firing);
    }

    /// Alerts that were open when the aggregator stopped: not sent again as
    /// new, and posted again to Alertmanager with the others after `grace`
    /// (the agents' time to reconnect and report what changed meanwhile;
    /// one that resolved by then is not posted as firing).
    pub fn resume(&self, open: Vec<NodeFinding>, grace: Duration) {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let mut firing = self.firing.lock().unwrap_or_else(|p| p.into_inner());
        let after = std::time::Instant::now() + grace;
        for nf in open {
            if let Some(f) = &nf.finding {
                sent.insert((nf.node_id.clone(), f.id.clone(), f.state));
                firing.insert((nf.node_id.clone(), f.id.clone()), (nf, Some(after)));
            }
        }
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
        {
            let mut firing = self.firing.lock().unwrap_or_else(|p| p.into_inner());
            let key = (nf.node_id.clone(), f.id.clone());
            if f.state() == FindingState::Open {
                firing.insert(key, (nf.clone(), None));
            } else {
                firing.remove(&key);
            }
        }
        for sink in self.sinks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = sink.send(nf.clone());
        }
    }
}

fn spawn_sinks(
    cfgs: &[AlertSinkConfig],
    firing: &Firing,
) -> Vec<mpsc::UnboundedSender<NodeFinding>> {
    cfgs.iter()
        .filter_map(|cfg| {
            let (tx, rx) = mpsc::unbounded_channel();
            let target = match Target::of(cfg) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(sink = %cfg.url, "alert sink not started, its alerts are not sent: {e}");
                    return None;
                }
            };
            tokio::spawn(deliver(cfg.clone(), target.clone(), rx));
            if cfg.kind == AlertSinkKind::Alertmanager {
                // Ends with the sink: its queue's sender is dropped when a
                // reload replaces it.
                tokio::spawn(resend(cfg.clone(), target, firing.clone(), tx.downgrade()));
            }
            Some(tx)
        })
        .collect()
}

/// Posts every open alert to one Alertmanager each `cfg.resend`, in one
/// request, while its sink lives. A failed post waits for the next round.
async fn resend(
    cfg: AlertSinkConfig,
    target: Target,
    firing: Firing,
    sink: mpsc::WeakUnboundedSender<NodeFinding>,
) {
    let Target::Http { http, url } = target else {
        return;
    };
    // A quarter second after the fleet's evaluation of a wall second, in
    // every member of a pair alike: an alert one member resolved in that
    // evaluation, the other resolved too unless its reports came later.
    let start = super::fleet::wall_aligned(cfg.resend, Duration::from_millis(250));
    let mut tick = tokio::time::interval_at(start, cfg.resend);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if sink.upgrade().is_none() {
            return;
        }
        let now = std::time::Instant::now();
        let open: Vec<NodeFinding> = firing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(_, after)| after.is_none_or(|t| t <= now))
            .map(|(nf, _)| nf.clone())
            .collect();
        if open.is_empty() {
            continue;
        }
        let now = crate::model::now_unix_ms();
        let body: Vec<Value> = open
            .iter()
            .filter_map(|nf| {
                Some(alertmanager_alert(
                    nf,
                    nf.finding.as_ref()?,
                    now,
                    cfg.resend,
                ))
            })
            .collect();
        match http.post(&url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::warn!(sink = %cfg.url, alerts = body.len(), "alert resend failed: HTTP {}", r.status())
            }
            Err(e) => {
                tracing::warn!(sink = %cfg.url, alerts = body.len(), "alert resend failed: {}", crate::error_chain(&e))
            }
        }
    }
}

/// Where one sink sends: an HTTP endpoint with the client it posts with
/// (its timeout), or an SMTP server.
#[derive(Clone)]
enum Target {
    Http { http: reqwest::Client, url: String },
    Email(Arc<super::email::Mailer>),
}

impl Target {
    fn of(cfg: &AlertSinkConfig) -> Result<Target, String> {
        let url = match cfg.kind {
            AlertSinkKind::Email => {
                return super::email::Mailer::new(cfg).map(|m| Target::Email(Arc::new(m)))
            }
            AlertSinkKind::Alertmanager => {
                format!("{}/api/v2/alerts", cfg.url.trim_end_matches('/'))
            }
            _ => cfg.url.clone(),
        };
        Ok(Target::Http {
            http: reqwest::Client::builder()
                .timeout(cfg.timeout)
                .build()
                .unwrap_or_default(),
            url,
        })
    }

    /// One attempt to deliver `nf`.
    async fn send(&self, cfg: &AlertSinkConfig, nf: &NodeFinding) -> Result<(), String> {
        match self {
            Target::Http { http, url } => {
                let body = payload(cfg, nf, crate::model::now_unix_ms());
                match http.post(url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("HTTP {}", r.status())),
                    Err(e) => Err(crate::error_chain(&e)),
                }
            }
            Target::Email(mailer) => mailer.send(nf).await,
        }
    }
}

async fn deliver(
    cfg: AlertSinkConfig,
    target: Target,
    mut rx: mpsc::UnboundedReceiver<NodeFinding>,
) {
    while let Some(nf) = rx.recv().await {
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
            let Err(error) = target.send(&cfg, &nf).await else {
                break;
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

pub(super) fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) fn subject(nf: &NodeFinding, f: &Finding) -> String {
    if nf.node_id.is_empty() {
        format!("network {}", f.network)
    } else {
        format!("{} ({})", nf.node_id, f.network)
    }
}

/// The version of the webhook body's shape; README.md documents it. A
/// change that renames or removes a field raises it.
pub const WEBHOOK_VERSION: u32 = 1;

/// The generic webhook's body: its own shape, kept apart from what
/// `outpost query --json` prints so that neither changes the other.
fn webhook_body(nf: &NodeFinding, f: &Finding) -> Value {
    json!({
        "version": WEBHOOK_VERSION,
        "id": f.id,
        "kind": f.kind().label(),
        "severity": f.severity().label(),
        "state": f.state().label(),
        "network": f.network,
        "node_id": nf.node_id,
        "height": f.height,
        "opened_at": rfc3339(f.opened_at_unix_ms),
        "resolved_at": (f.resolved_at_unix_ms != 0).then(|| rfc3339(f.resolved_at_unix_ms)),
        "summary": f.summary,
        "verdict": f.verdict().label(),
        "verdict_reason": f.verdict_reason,
        "fork_point": f.fork_point,
        "depth": f.depth,
        "replaced_hash": (!f.replaced_hash.is_empty()).then(|| hex(&f.replaced_hash)),
        "new_hash": (!f.new_hash.is_empty()).then(|| hex(&f.new_hash)),
        "groups": f.groups.iter().map(|g| json!({
            "hash": hex(&g.hash),
            "node_ids": g.node_ids,
            "canonical": g.canonical,
        })).collect::<Vec<_>>(),
        "nodes": f.nodes,
        "cause_id": (!f.cause_id.is_empty()).then_some(&f.cause_id),
    })
}

/// The body `cfg`'s sink gets for `nf`, at `now` (Unix ms).
pub fn payload(cfg: &AlertSinkConfig, nf: &NodeFinding, now: i64) -> Value {
    let Some(f) = &nf.finding else {
        return Value::Null;
    };
    match cfg.kind {
        AlertSinkKind::Webhook => webhook_body(nf, f),
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
        AlertSinkKind::Alertmanager => json!([alertmanager_alert(nf, f, now, cfg.resend)]),
        // Sent as a message (email.rs), not as a body.
        AlertSinkKind::Email => Value::Null,
    }
}

/// One alert as Alertmanager's v2 API takes it. The labels name the finding
/// and are the same from every aggregator of a pair; an open one is active
/// until four resends from `now`.
fn alertmanager_alert(nf: &NodeFinding, f: &Finding, now: i64, resend: Duration) -> Value {
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
            "nodes": f.nodes.join(", "),
        },
        "startsAt": rfc3339(f.opened_at_unix_ms),
        "generatorURL": format!("outpost://aggregator/findings/{}", f.id),
    });
    match f.state() {
        FindingState::Resolved => alert["endsAt"] = json!(rfc3339(f.resolved_at_unix_ms)),
        // Something that happened once fires for five minutes.
        FindingState::Occurred => alert["endsAt"] = json!(rfc3339(f.opened_at_unix_ms + 300_000)),
        _ => alert["endsAt"] = json!(rfc3339(now + 4 * resend.as_millis() as i64)),
    }
    if !f.groups.is_empty() {
        let groups: Vec<String> = f
            .groups
            .iter()
            .map(|g| format!("{}: {}", hex(&g.hash), g.node_ids.join(",")))
            .collect();
        alert["annotations"]["groups"] = json!(groups.join("; "));
    }
    alert
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FindingKind, Verdict};

    fn sink(kind: AlertSinkKind) -> AlertSinkConfig {
        AlertSinkConfig {
            kind,
            url: "http://127.0.0.1:9".into(),
            timeout: Duration::from_secs(1),
            max_attempts: 1,
            resend: Duration::from_secs(60),
            from: None,
            to: Vec::new(),
            username: None,
            password_file: None,
            ca: None,
        }
    }

    /// What both members of a pair post for one open finding, each at its
    /// own time: the same labels, active until four resends from then.
    #[test]
    fn an_open_alert_is_active_for_four_resends_and_labelled_alike_by_any_member() {
        let nf = |opened_at_unix_ms| NodeFinding {
            node_id: "node-3".into(),
            finding: Some(Finding {
                id: "lag:node-3:h120".into(),
                kind: FindingKind::Lag as i32,
                state: FindingState::Open as i32,
                opened_at_unix_ms,
                verdict: Verdict::Node as i32,
                network: "devnet".into(),
                ..Default::default()
            }),
        };
        let cfg = sink(AlertSinkKind::Alertmanager);
        let a = payload(&cfg, &nf(1_700_000_000_000), 1_700_000_000_000);
        let b = payload(&cfg, &nf(1_700_000_000_350), 1_700_000_001_000);
        assert_eq!(a[0]["labels"], b[0]["labels"]);
        assert_eq!(a[0]["labels"]["finding_id"], "lag:node-3:h120");
        assert_eq!(a[0]["endsAt"], "2023-11-14T22:17:20.000Z");
        let mut resolved = nf(1_700_000_000_000);
        if let Some(f) = &mut resolved.finding {
            f.state = FindingState::Resolved as i32;
            f.resolved_at_unix_ms = 1_700_000_030_000;
        }
        let r = payload(&cfg, &resolved, 1_700_000_031_000);
        assert_eq!(r[0]["endsAt"], "2023-11-14T22:13:50.000Z");
        assert_eq!(r[0]["labels"], a[0]["labels"]);
    }

    #[test]
    fn the_webhook_body_has_its_own_versioned_shape() {
        let nf = NodeFinding {
            node_id: "node-2".into(),
            finding: Some(Finding {
                id: "reorg-9-1".into(),
                kind: FindingKind::Reorg as i32,
                state: FindingState::Occurred as i32,
                opened_at_unix_ms: 1_700_000_000_000,
                resolved_at_unix_ms: 1_700_000_000_000,
                verdict: Verdict::Network as i32,
                cause_id: "reorg:@devnet:f7:aa".into(),
                replaced_hash: vec![0xaa, 0xbb],
                network: "devnet".into(),
                ..Default::default()
            }),
        };
        let v = payload(&sink(AlertSinkKind::Webhook), &nf, 0);
        assert_eq!(v["version"], 1);
        assert_eq!(v["node_id"], "node-2");
        assert_eq!(v["kind"], "reorg");
        assert_eq!(v["opened_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["replaced_hash"], "0xaabb");
        assert_eq!(v["new_hash"], Value::Null);
        assert_eq!(v["cause_id"], "reorg:@devnet:f7:aa");
        assert_eq!(v["verdict"], "network");
        // The query printer's field names are not part of it.
        assert_eq!(v.get("opened_at_unix_ms"), None);
    }
}
