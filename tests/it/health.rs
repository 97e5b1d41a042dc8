//! `/healthz` and `/readyz` on the aggregator's metrics listener.

use serde_json::Value;

use crate::harness::{Aggregator, World};

#[tokio::test]
async fn the_aggregator_says_it_is_alive_and_ready_with_one_line_per_check() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let get = |path: &'static str| {
        let url = format!("http://127.0.0.1:{}{path}", agg.metrics_port);
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (code, body) = get("/healthz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true, "{body}");
    let checks: Vec<(&str, bool)> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["check"].as_str().unwrap(), c["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(checks, [("store", true), ("listener", true)], "{body}");
    let listener = format!("accepting on 127.0.0.1:{}", agg.port);
    assert!(body.contains(&listener), "{body}");
    assert_eq!(
        body.lines().filter(|l| l.contains("\"check\"")).count(),
        2,
        "{body}"
    );
    let (code, _) = get("/nothing").await;
    assert_eq!(code, 404);
}
