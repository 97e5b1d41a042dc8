//! How long the fleet page takes to draw a fleet, in a real headless
//! Chromium: the view the aggregator sends (`page::view_json`) for N nodes
//! in 10 networks with one open finding per 20 nodes, parsed and drawn by
//! the page's own script, layout included. Baseline, in the same browser and
//! run: the same rows set as one ready-made HTML string (the browser's own
//! parser, the fastest a table can appear). Median of 9 of each.
//!
//! Run: `cargo bench --bench fleet_page` (OUTPOST_PAGE_NODES=100,1000,...
//! sets the fleet sizes). Needs Debian's chromium.

#[path = "../tests/it/browser.rs"]
mod browser;

use outpost::aggregator::page::view_json;
use outpost::proto::{self, FleetNode, NetworkView, NodeFinding};

const NETWORKS: usize = 10;
const RUNS: usize = 9;

fn fleet(n: usize) -> Vec<NetworkView> {
    let mut nets: Vec<NetworkView> = (0..NETWORKS)
        .map(|k| NetworkView {
            network: format!("net-{k}"),
            chain: "ethereum".into(),
            fleet_head: 21_000_000,
            ..Default::default()
        })
        .collect();
    for i in 0..n {
        let net = &mut nets[i % NETWORKS];
        let lagging = i % 20 == 7;
        net.nodes.push(FleetNode {
            node_id: format!("node-{i:05}"),
            height: if lagging { 20_999_990 } else { 21_000_000 },
            hash: (0..32).map(|b| (b * 7 + i) as u8).collect(),
            lag: if lagging { 10 } else { 0 },
            agrees: true,
            status: if lagging { "lagging" } else { "ok" }.into(),
        });
        if lagging {
            net.open_findings.push(NodeFinding {
                node_id: format!("node-{i:05}"),
                finding: Some(proto::Finding {
                    id: format!("lag-node-{i:05}"),
                    kind: proto::FindingKind::Lag as i32,
                    severity: proto::Severity::Warning as i32,
                    state: proto::FindingState::Open as i32,
                    height: 20_999_990,
                    opened_at_unix_ms: 1_700_000_000_000,
                    summary: format!(
                        "node-{i:05} is 10 blocks behind the fleet head 21000000 (at 20999990)"
                    ),
                    verdict: proto::Verdict::Node as i32,
                    verdict_reason: "its peers are at the head".into(),
                    network: net.network.clone(),
                    ..Default::default()
                }),
            });
        }
    }
    nets
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Milliseconds of one draw, to the next frame painted.
const DRAW: &str = r#"(async () => {
  const view = window.benchView;
  const started = performance.now();
  window.outpostRenderView(JSON.parse(view));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return performance.now() - started;
})()"#;

/// The same rows as one HTML string, set at once.
const BASELINE: &str = r#"(async () => {
  const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
  const view = JSON.parse(window.benchView);
  const html = view.networks.map(n =>
    `<section><h2>${esc(n.network)}</h2><table><tbody>` +
    n.nodes.map(m => `<tr><td>${esc(m.node_id)}</td><td>${m.height}</td><td>${m.lag}</td>` +
      `<td>${esc(m.hash)}</td><td>${m.agrees}</td><td>${esc(m.status)}</td></tr>`).join('') +
    `</tbody></table><table><tbody>` +
    n.open_findings.map(f => `<tr><td>${esc(f.node_id)}</td><td>${esc(f.kind)}</td>` +
      `<td>${esc(f.summary)}</td><td>${esc(f.verdict_reason)}</td></tr>`).join('') +
    `</tbody></table></section>`).join('');
  const started = performance.now();
  document.getElementById('networks').innerHTML = html;
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return performance.now() - started;
})()"#;

fn main() {
    let sizes: Vec<usize> = std::env::var("OUTPOST_PAGE_NODES")
        .unwrap_or_else(|_| "100,1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // The page's own files, as the binary embeds them; its live stream
        // has no aggregator behind it here, so only the drawing is timed.
        let page = format!(
            "file://{}/agent/aggregator/page/fleet.html",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut b = browser::Browser::open(&page).await;
        while b.eval("typeof window.outpostRenderView").await != "function" {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        println!("| nodes | view bytes | page draws, ms (median of {RUNS}) | one HTML string, ms | ratio |");
        println!("|---|---|---|---|---|");
        for n in sizes {
            let text = view_json(&fleet(n)).to_string();
            let literal = serde_json::to_string(&text).expect("a JSON string");
            b.eval(&format!("window.benchView = {literal}; true")).await;
            let (mut page, mut base) = (Vec::new(), Vec::new());
            for _ in 0..RUNS {
                page.push(b.eval(DRAW).await.as_f64().expect("ms"));
                base.push(b.eval(BASELINE).await.as_f64().expect("ms"));
            }
            let rows = b
                .eval("window.outpostRenderView(JSON.parse(window.benchView)); document.querySelectorAll('tr[data-node]').length")
                .await;
            assert_eq!(rows.as_u64(), Some(n as u64 + n as u64 / 20), "every node and finding drawn");
            let (p, q) = (median(page), median(base));
            println!(
                "| {n} | {} | {p:.1} | {q:.1} | {:.2} |",
                text.len(),
                p / q
            );
        }
        let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-page/bench.png");
        b.screenshot(&shot).await;
        println!("the last fleet drawn: {}", shot.display());
    });
}
