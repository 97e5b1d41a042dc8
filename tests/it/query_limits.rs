//! The query API's rate limit per operator identity.

use std::time::Duration;

use outpost::proto::{ListNodesRequest, WatchRequest};
use outpost::tls::Identity;

use crate::harness::{wait_for, Aggregator, World};

/// Calls `list_nodes` `n` times at once as `operator`: how many were
/// admitted, and the refusals.
async fn burst(
    world: &World,
    agg: &Aggregator,
    operator: &str,
    n: usize,
) -> (usize, Vec<tonic::Status>) {
    let mut conn = world.operator(agg);
    world.issue(&Identity::Operator(operator.into()));
    let pki = world.pki();
    conn.cert = Some(pki.cert(&format!("operator-{operator}")));
    conn.key = Some(pki.key(&format!("operator-{operator}")));
    let mut client = outpost::operator::connect(&conn).await.unwrap();
    let (mut admitted, mut refused) = (0, Vec::new());
    for _ in 0..n {
        match client.list_nodes(ListNodesRequest {}).await {
            Ok(_) => admitted += 1,
            Err(s) => refused.push(s),
        }
    }
    (admitted, refused)
}

fn count(log: &std::path::Path, text: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(text))
        .count()
}

#[tokio::test]
async fn an_operator_over_its_rate_is_refused_with_the_wait_and_others_are_not() {
    let world = World::new();
    let agg =
        Aggregator::start_with(&world, "[limits]\nquery_per_second = 1\nquery_burst = 3\n").await;

    let (admitted, refused) = burst(&world, &agg, "alice", 8).await;
    assert!((3..=4).contains(&admitted), "admitted {admitted}");
    assert_eq!(admitted + refused.len(), 8);
    for s in &refused {
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(
            s.message().contains("query rate limit for alice"),
            "{}",
            s.message()
        );
        assert!(s.message().contains("retry in"), "{}", s.message());
        let wait: u64 = s
            .metadata()
            .get("retry-after-ms")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=1000).contains(&wait), "{wait}");
    }

    // Another operator has its own bucket.
    let (bob, refused_bob) = burst(&world, &agg, "bob", 3).await;
    assert_eq!((bob, refused_bob.len()), (3, 0));

    // One audit line for the refused burst, and a metric that counts each.
    let refusal = "query refused: over the rate limit";
    wait_for(
        "the refusal's audit line",
        Duration::from_secs(5),
        &[&agg.log],
        || async { (count(&agg.log, refusal) >= 1).then_some(()) },
    )
    .await;
    assert_eq!(count(&agg.log, refusal), 1);
    let metrics = agg.metrics().await;
    let series = format!(
        "outpost_query_refused_total{{operator=\"alice\"}} {}",
        refused.len()
    );
    assert!(
        metrics.contains(&series),
        "{series} missing from\n{metrics}"
    );
    assert!(!metrics.contains("operator=\"bob\""), "{metrics}");

    // Refilled: admitted again, and the audit log says how many were refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (again, _) = burst(&world, &agg, "alice", 1).await;
    assert_eq!(again, 1);
    let admitted_again = format!("refused={}", refused.len());
    wait_for(
        "the admitted-again audit line",
        Duration::from_secs(5),
        &[&agg.log],
        || async {
            std::fs::read_to_string(&agg.log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("admitted again") && l.contains(&admitted_again))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_watch_stream_counts_once_when_it_opens() {
    let world = World::new();
    let agg =
        Aggregator::start_with(&world, "[limits]\nquery_per_second = 1\nquery_burst = 3\n").await;
    world.issue(&Identity::Operator("carol".into()));
    let mut conn = world.operator(&agg);
    let pki = world.pki();
    conn.cert = Some(pki.cert("operator-carol"));
    conn.key = Some(pki.key("operator-carol"));
    let mut client = outpost::operator::connect(&conn).await.unwrap();
    let mut watch = client
        .watch(WatchRequest {
            network: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // The watch took one token of three: two calls pass, the third is refused.
    let (admitted, refused) = burst(&world, &agg, "carol", 3).await;
    assert_eq!((admitted, refused.len()), (2, 1));
    // The stream itself is still open: nothing arrives, and it has not ended.
    let next = tokio::time::timeout(Duration::from_millis(500), watch.message()).await;
    assert!(next.is_err(), "the watch ended or got {next:?}");
}
