//! The live fleet page in a real headless Chromium: node rows, and a
//! divergence that appears and resolves without a reload.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::browser::Browser;
use crate::fleet::{fast, Fleet};
use crate::harness::{Aggregator, World};

const GENESIS: u64 = 1_700_000_000;
const WAIT: Duration = Duration::from_secs(40);

/// What the page shows: each node row's node, status and height, and each
/// open finding's kind, node and fault (`null` until the page has loaded).
const SHOWN: &str = r#"document.getElementById('state') && ({
  nodes: Array.from(document.querySelectorAll('tr[data-status]'))
    .map(r => [r.dataset.node, r.dataset.status, r.cells[1].textContent]),
  findings: Array.from(document.querySelectorAll('tr[data-finding]'))
    .map(r => [r.dataset.kind, r.dataset.node, r.querySelector('.verdict').textContent]),
  live: document.getElementById('state').dataset.state,
  mark: window.outpostMark || null,
  views: window.outpostRender ? window.outpostRender.views : 0,
})"#;

async fn wait_shown(
    browser: &mut Browser,
    what: &str,
    fleet: &Fleet,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let shown = browser.eval(SHOWN).await;
        if check(&shown) {
            return shown;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&fleet.agg.log).unwrap_or_default();
            panic!("the page never showed {what}; it shows {shown}\naggregator log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn node_is(shown: &Value, node: &str, status: &str) -> bool {
    shown["nodes"]
        .as_array()
        .is_some_and(|rows| rows.iter().any(|r| r[0] == node && r[1] == status))
}

fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("fleet-page")
        .join(name)
}

#[tokio::test]
async fn the_fleet_page_shows_a_divergence_open_and_resolve_without_a_reload() {
    let mut fleet = Fleet::of(
        3,
        "[fleet]\nsilent_after = \"30s\"\nlag_blocks = 50\n",
        fast,
    )
    .await;
    for i in 1..=5 {
        fleet.mine_at(&[0, 1, 2], GENESIS + 12 * i).await;
    }
    fleet.all_at_head().await;

    let url = format!("http://127.0.0.1:{}/", fleet.agg.metrics_port);
    let mut browser = Browser::open(&url).await;
    let shown = wait_shown(&mut browser, "three nodes at height 5", &fleet, |s| {
        s["live"] == "live"
            && (1..=3).all(|i| {
                s["nodes"].as_array().is_some_and(|rows| {
                    rows.iter()
                        .any(|r| r[0] == format!("node-{i}") && r[1] == "ok" && r[2] == "5")
                })
            })
    })
    .await;
    assert_eq!(shown["findings"], serde_json::json!([]), "{shown}");
    // Gone if the page reloads.
    browser.eval("window.outpostMark = 'kept'").await;

    // Heights 6..=8: node-3 mines blocks of its own.
    for i in 6..=8 {
        fleet.mine_at(&[0, 1], GENESIS + 12 * i).await;
        fleet.mine_at(&[2], GENESIS + 12 * i + 1).await;
    }
    let shown = wait_shown(&mut browser, "node-3 diverged", &fleet, |s| {
        node_is(s, "node-3", "diverged")
            && s["findings"].as_array().is_some_and(|f| {
                f.iter()
                    .any(|f| f[0] == "divergence" && f[1] == "node-3" && f[2] == "node")
            })
    })
    .await;
    assert!(node_is(&shown, "node-1", "ok"), "{shown}");
    assert!(node_is(&shown, "node-2", "ok"), "{shown}");
    let diverged = artifact("diverged.png");
    browser.screenshot(&diverged).await;

    // node-3 comes back on the majority's blocks.
    fleet.anvils[2].kill();
    fleet.anvils[2].restart().await;
    for i in 1..=8 {
        fleet.mine_at(&[2], GENESIS + 12 * i).await;
    }
    let shown = wait_shown(&mut browser, "node-3 agreeing again", &fleet, |s| {
        node_is(s, "node-3", "ok")
            && s["findings"]
                .as_array()
                .is_some_and(|f| !f.iter().any(|f| f[0] == "divergence"))
    })
    .await;
    assert_eq!(shown["mark"], "kept", "the page was not reloaded: {shown}");
    assert!(shown["views"].as_u64().unwrap_or(0) >= 3, "{shown}");
    let resolved = artifact("resolved.png");
    browser.screenshot(&resolved).await;
    for png in [&diverged, &resolved] {
        let bytes = std::fs::read(png).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{}",
            png.display()
        );
    }
    println!("screenshots: {} {}", diverged.display(), resolved.display());
}

#[tokio::test]
async fn the_fleet_page_comes_with_its_policy_and_caps_its_watchers() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let base = format!("http://127.0.0.1:{}", agg.metrics_port);
    let page = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(
        page.headers()["content-security-policy"],
        "default-src 'self'; frame-ancestors 'none'"
    );
    assert!(page.text().await.unwrap().contains("fleet.js"));
    let view: Value = reqwest::get(format!("{base}/fleet.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["networks"], serde_json::json!([]), "{view}");

    let client = reqwest::Client::new();
    let mut watching = Vec::new();
    for _ in 0..outpost::aggregator::page::MAX_WATCHERS {
        let r = client.get(format!("{base}/events")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        watching.push(r);
    }
    let refused = client.get(format!("{base}/events")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    // A browser that leaves makes room for the next.
    drop(watching.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let r = client.get(format!("{base}/events")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a watcher's place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
