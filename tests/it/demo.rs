//! `outpost demo`: what it prints says what the fleet view says.

use std::process::Command;

use crate::harness::outpost_bin;

#[test]
fn the_demo_shows_the_fleet_view_in_plain_words() {
    let out = Command::new(outpost_bin())
        .args(["demo", "--duration", "45s"])
        .output()
        .expect("outpost demo runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("node-2: a chain that follows a side branch 8 blocks deep every 16 blocks"),
        "{text}"
    );
    assert!(
        text.contains("node-3: a chain 3 times slower than the others"),
        "{text}"
    );
    let page = text
        .lines()
        .find_map(|l| l.strip_prefix("live fleet page at "))
        .unwrap_or_else(|| panic!("the demo names its fleet page:\n{text}"));
    assert!(page.starts_with("http://127.0.0.1:"), "{page}");
    assert!(
        !text.contains("Reorg {") && !text.contains("Lag {"),
        "{text}"
    );
    let rows = |node: &str, status: &str| {
        text.lines()
            .filter(|l| l.trim_start().starts_with(node) && l.trim_end().ends_with(status))
            .count()
    };
    assert!(
        rows("node-3", "lagging") > 0,
        "node-3 never shown lagging:\n{text}"
    );
    assert!(
        rows("node-2", "diverged") > 0,
        "node-2 never shown diverged:\n{text}"
    );
    assert!(rows("node-1", "ok") > 0, "{text}");
    assert!(
        text.lines().any(|l| l.contains("node-2")
            && l.contains("divergence")
            && l.contains("[fault: node]")),
        "{text}"
    );
}
