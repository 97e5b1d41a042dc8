//! `/healthz` and `/readyz` on the aggregator's metrics listener, and the
//! agent's own listener.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{free_port, wait_for, Agent, AgentOptions, Aggregator, Anvil, World};

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

/// An agent of `anvil` whose `[metrics] listen` is on `port`.
fn agent_listening_on(world: &World, agg: &Aggregator, anvil: &Anvil, port: u16) -> Agent {
    let tables: &'static str =
        Box::leak(format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n").into_boxed_str());
    Agent::start(
        world,
        "n1",
        &anvil.url(),
        agg,
        AgentOptions {
            extra_tables: tables,
            ..Default::default()
        },
    )
}

/// The agent's `[metrics] listen`: its own series and readiness, connected
/// and then buffering with its aggregator gone.
#[tokio::test]
async fn the_agent_serves_its_metrics_and_stays_ready_while_buffering() {
    let world = World::new();
    let mut agg = Aggregator::start(&world).await;
    let anvil = Anvil::start(&world, "anvil").await;
    anvil.mine(3).await;
    let port = free_port();
    let agent = agent_listening_on(&world, &agg, &anvil, port);
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    };
    let aggregator = format!("aggregator=\"https://127.0.0.1:{}\"", agg.port);
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let connected = format!("outpost_agent_aggregator_connected{{{aggregator}}}");
    let text = wait_for(
        "the agent's metrics",
        Duration::from_secs(30),
        &[&agent.log],
        || async {
            let (_, text) = get("/metrics").await?;
            (value(&text, "outpost_agent_head_height")? >= 3.0
                && value(&text, &connected)? == 1.0
                && value(&text, "outpost_agent_poll_duration_seconds_count")? > 0.0)
                .then_some(text)
        },
    )
    .await;
    assert_eq!(
        value(&text, "outpost_agent_breaker_open"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "outpost_agent_outbox_quota_bytes"),
        Some((64u64 << 20) as f64),
        "{text}"
    );
    let (code, _) = get("/healthz").await.unwrap();
    assert_eq!(code, 200);
    let (code, body) = get("/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["store", "report", "actors"], "{body}");
    assert!(body.contains("connected to https://127.0.0.1:"), "{body}");

    // The aggregator dies: the agent buffers, says so, and stays ready.
    agg.kill9();
    anvil.mine(5).await;
    let backlog = format!("outpost_agent_aggregator_backlog_events{{{aggregator}}}");
    wait_for(
        "the backlog to grow with no aggregator",
        Duration::from_secs(30),
        &[&agent.log],
        || async {
            let (_, text) = get("/metrics").await?;
            (value(&text, &connected)? == 0.0
                && value(&text, &backlog)? > 0.0
                && value(&text, "outpost_agent_outbox_bytes")? > 0.0)
                .then_some(())
        },
    )
    .await;
    let (code, body) = get("/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("no aggregator connected; buffering"),
        "{body}"
    );
}

/// A `[metrics] listen` port that is taken stops the agent with a message.
#[tokio::test]
async fn the_agent_refuses_to_start_on_a_taken_metrics_port() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let anvil = Anvil::start(&world, "anvil").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut agent = agent_listening_on(&world, &agg, &anvil, port);
    let log = agent.log.clone();
    let status = wait_for(
        "the agent to exit",
        Duration::from_secs(20),
        &[&log],
        || {
            let s = agent.exited();
            async move { s }
        },
    )
    .await;
    assert!(!status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "metrics.listen: cannot listen on 127.0.0.1:{port}"
        )),
        "{text}"
    );
}
