//! An HA pair: one agent reports every event to two aggregators, each
//! stream with its own resume point and acknowledgements.

use std::sync::Arc;
use std::time::Duration;

use outpost::proto::GetNodeRequest;
use outpost::store::local::LocalStore;
use outpost::store::Durability;

use crate::delivery::{assert_complete, event_log};
use crate::harness::{wait_for, Agent, AgentOptions, Aggregator, Anvil, Miner, World};
use crate::spine::wait_at_head;

#[tokio::test]
async fn an_agent_delivers_everything_to_both_of_a_pair_and_one_down_holds_back_neither() {
    let world = World::new();
    let anvil = Arc::new(Anvil::start(&world, "anvil").await);
    let a = Aggregator::start_named(&world, "agg-a", "127.0.0.1", "").await;
    let mut b = Aggregator::start_named(&world, "agg-b", "127.0.0.1", "").await;
    let mut agent = Agent::start(
        &world,
        "node-1",
        &anvil.url(),
        &a,
        AgentOptions {
            poll_interval: "50ms",
            block_time: "60s",
            also_report_to: vec![b.port],
            ..Default::default()
        },
    );
    let mut qa = world.query(&a).await;
    let mut qb = world.query(&b).await;
    anvil.mine(5).await;
    wait_at_head(&mut qa, &anvil, &agent, &a).await;
    wait_at_head(&mut qb, &anvil, &agent, &b).await;

    // b is killed while blocks keep coming: a keeps up.
    b.kill9();
    let miner = Miner::start(anvil.clone(), Duration::from_millis(60));
    tokio::time::sleep(Duration::from_secs(2)).await;
    miner.stop().await;
    wait_at_head(&mut qa, &anvil, &agent, &a).await;
    // The agent's status, at a, shows b's backlog.
    let b_url = format!("https://127.0.0.1:{}", b.port);
    let logs = [agent.log.as_path(), a.log.as_path()];
    let waiting = wait_for(
        "a status that shows b's backlog",
        Duration::from_secs(10),
        &logs,
        || {
            let mut q = qa.clone();
            let b_url = b_url.clone();
            async move {
                let d = q
                    .get_node(GetNodeRequest {
                        node_id: "node-1".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let ds = d.status?.deliveries;
                let b = ds.iter().find(|d| d.aggregator == b_url)?.clone();
                (ds.len() == 2 && !b.connected && b.backlog > 20).then_some(ds)
            }
        },
    )
    .await;
    let to_a = waiting.iter().find(|d| d.aggregator != b_url).unwrap();
    assert!(to_a.connected && to_a.backlog < 5, "{waiting:?}");

    // b comes back and catches up from its own resume point.
    b.restart(&world).await;
    let mut qb = world.query(&b).await;
    wait_at_head(&mut qb, &anvil, &agent, &b).await;
    assert!(agent.terminate().unwrap().success());

    // Each holds every event once, every block once, with the same seqs.
    let n = assert_complete(&mut qa, "node-1", &anvil).await;
    assert_eq!(assert_complete(&mut qb, "node-1", &anvil).await, n);
    let (la, lb) = (
        event_log(&mut qa, "node-1").await,
        event_log(&mut qb, "node-1").await,
    );
    assert_eq!(la, lb, "both aggregators hold the same events");
    // And the agent's outbox is empty: both acknowledged everything.
    let store =
        LocalStore::open(&agent.data_dir, 1 << 20, Durability::ProcessCrash, u64::MAX).unwrap();
    assert_eq!(store.records_after(0, 10).unwrap().len(), 0);
}
