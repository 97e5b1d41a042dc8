//! Logs reach a real journald with native fields. journald runs by hand in a
//! private mount namespace (tmpfs over /run/systemd and /run/log), so the
//! test needs root and util-linux's unshare, as CI has.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::harness::{outpost_bin, AgentOptions, Solo};

const SCRIPT: &str = r#"
set -eu
mount -t tmpfs tmpfs /run/systemd
mount -t tmpfs tmpfs /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
/lib/systemd/systemd-journald &
JOURNALD=$!
for _ in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
OUTPOST_LOG_TARGET=journald RUST_LOG=info "$OUTPOST" agent --config "$CONFIG" &
AGENT=$!
sleep 5
kill -TERM $AGENT
wait $AGENT
sleep 0.5
journalctl --no-pager -o json > "$OUT"
kill $JOURNALD
"#;

#[tokio::test]
async fn agent_logs_reach_journald_with_node_chain_actor_and_finding_fields() {
    for part in [
        "/lib/systemd/systemd-journald",
        "/usr/bin/journalctl",
        "/usr/bin/unshare",
    ] {
        assert!(
            Path::new(part).exists(),
            "{part} not found: install Debian's systemd and util-linux (tests/run.sh does)"
        );
    }
    let mut solo = Solo::start(AgentOptions {
        block_time: "500ms",
        ..Default::default()
    })
    .await;
    // The agent runs inside the namespace instead; Solo's copy stops here.
    solo.agent.kill9();
    let out = solo.world.path().join("journal.json");
    let status = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", SCRIPT])
        .env("OUTPOST", outpost_bin())
        .env("CONFIG", &solo.agent.config)
        .env("OUT", &out)
        .status()
        .expect("unshare runs");
    assert!(status.success(), "the journald script failed: {status:?}");
    let entries: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &Value| e["SYSLOG_IDENTIFIER"] == "outpost")
        .collect();
    assert!(!entries.is_empty(), "no outpost entries in the journal");
    let actors: std::collections::BTreeSet<&str> = entries
        .iter()
        .filter(|e| e["NODE_ID"] == "node-1" && e["CHAIN"] == "ethereum")
        .filter_map(|e| e["ACTOR"].as_str())
        .collect();
    for actor in ["ingest", "validate", "report"] {
        assert!(
            actors.contains(actor),
            "no entry with NODE_ID=node-1 CHAIN=ethereum ACTOR={actor}: {actors:?}"
        );
    }
    let stall = entries
        .iter()
        .find(|e| e["FINDING_KIND"] == "stall")
        .expect("the stall finding's entry carries FINDING_KIND");
    assert_eq!(stall["NODE_ID"], "node-1");
    assert_eq!(stall["PRIORITY"], "4", "a warning: {stall}");
    assert!(
        entries.iter().any(|e| e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains("agent stopped cleanly"))),
        "the clean stop is logged"
    );
}
