//! Config reload (SIGHUP, `systemctl reload`): which keys a new config
//! changes, and which of those apply without a restart.

use serde::Serialize;
use serde_json::Value;

/// One key whose value differs, as a dotted TOML path with both values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.old, self.new)
    }
}

/// Every key whose value differs between two configs of one kind. Tables are
/// walked; arrays (such as the `[[alert]]` list) compare as one value.
pub fn changes<T: Serialize>(old: &T, new: &T) -> Vec<Change> {
    let (old, new) = match (serde_json::to_value(old), serde_json::to_value(new)) {
        (Ok(o), Ok(n)) => (o, n),
        // Config types are plain data; serialization cannot fail for them.
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    walk("", &old, &new, &mut out);
    out
}

fn walk(prefix: &str, old: &Value, new: &Value, out: &mut Vec<Change>) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(
                    &path,
                    o.get(k).unwrap_or(&Value::Null),
                    n.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if old != new => out.push(Change {
            key: prefix.to_string(),
            old: show(old),
            new: show(new),
        }),
        _ => {}
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "(unset)".into(),
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// True when `key` is one of `live` or lies under one of them (a table).
pub fn applies_live(key: &str, live: &[&str]) -> bool {
    live.iter().any(|l| {
        key == *l
            || key
                .strip_prefix(l)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The reload's plan: what applies now (relative to the config last loaded)
/// and what still waits for a restart (relative to the config the process
/// started with, so a pending restart is named at every reload).
pub struct Plan {
    pub live: Vec<Change>,
    pub needs_restart: Vec<Change>,
}

pub fn plan<T: Serialize>(started: &T, loaded: &T, new: &T, live: &[&str]) -> Plan {
    Plan {
        live: changes(loaded, new)
            .into_iter()
            .filter(|c| applies_live(&c.key, live))
            .collect(),
        needs_restart: changes(started, new)
            .into_iter()
            .filter(|c| !applies_live(&c.key, live))
            .collect(),
    }
}

/// Logs the outcome of a reload, one line per change.
pub fn log_plan(path: &std::path::Path, plan: &Plan) {
    if plan.live.is_empty() && plan.needs_restart.is_empty() {
        tracing::info!(config = %path.display(), "config reloaded: nothing changed");
    }
    for c in &plan.live {
        tracing::info!(config = %path.display(), key = %c.key, "config reloaded: {c}");
    }
    for c in &plan.needs_restart {
        tracing::warn!(
            config = %path.display(),
            key = %c.key,
            "config change needs a restart to apply: {c}"
        );
    }
}

/// Logs a refused reload, one line per problem.
pub fn log_refused(e: &crate::config::ConfigErrors) {
    for line in &e.0 {
        tracing::error!("config reload refused, the running config stays in force: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;

    fn agent(extra: &str) -> AgentConfig {
        toml::from_str(&format!(
            r#"node_id = "n1"
data_dir = "/tmp/x"
[source]
kind = "ethereum"
url = "http://127.0.0.1:8545"
[report]
aggregator = "https://a:7443"
ca = "ca.pem"
cert = "a.pem"
key = "a.key"
{extra}"#
        ))
        .unwrap()
    }

    #[test]
    fn names_each_changed_key_with_both_values() {
        let old = agent("");
        let mut new = old.clone();
        new.validate.stall_multiple = 5.0;
        new.node_id = "n2".into();
        let c = changes(&old, &new);
        let keys: Vec<&str> = c.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["node_id", "validate.stall_multiple"]);
        assert_eq!(c[0].to_string(), r#"node_id: "n1" -> "n2""#);
        assert!(changes(&old, &old.clone()).is_empty());
    }

    #[test]
    fn live_keys_match_whole_path_segments() {
        let live = ["validate", "source.poll_interval"];
        assert!(applies_live("validate.stall_multiple", &live));
        assert!(applies_live("source.poll_interval", &live));
        assert!(!applies_live("source.poll_interval_extra", &live));
        assert!(!applies_live("validated", &live));
        assert!(!applies_live("source.url", &live));
    }

    #[test]
    fn a_pending_restart_is_named_again_but_a_live_change_only_once() {
        let started = agent("");
        let mut loaded = started.clone();
        loaded.node_id = "n2".into();
        loaded.validate.stall_multiple = 5.0;
        let mut new = loaded.clone();
        new.source.poll_interval = std::time::Duration::from_secs(3);
        let p = plan(
            &started,
            &loaded,
            &new,
            &["validate", "source.poll_interval"],
        );
        let live: Vec<&str> = p.live.iter().map(|c| c.key.as_str()).collect();
        let restart: Vec<&str> = p.needs_restart.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(live, ["source.poll_interval"]);
        assert_eq!(restart, ["node_id"]);
    }
}
