//! Answers from several aggregators (shards, the members of an HA pair)
//! merged into one: every node once, from the aggregator that heard from it
//! last, marked where a member that serves its network does not have it.

use std::collections::{BTreeMap, BTreeSet};

use crate::proto::{NetworkView, NodeSummary};

/// One node of the merged answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedNode {
    pub node: NodeSummary,
    /// The aggregator whose report is the freshest.
    pub from: String,
    /// Aggregators that serve the node's network (they hold some node of
    /// it) and do not have this node: the member of a pair that lost it.
    pub missing_at: Vec<String>,
}

/// Merges the node lists of several aggregators, each named by endpoint,
/// in the order given. A node's freshest report wins (ties: the first
/// aggregator's).
pub fn nodes(answers: &[(String, Vec<NodeSummary>)]) -> Vec<MergedNode> {
    let mut serving: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut holders: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut best: BTreeMap<&str, (&NodeSummary, &str)> = BTreeMap::new();
    for (endpoint, list) in answers {
        for n in list {
            serving.entry(&n.network).or_default().insert(endpoint);
            holders.entry(&n.node_id).or_default().insert(endpoint);
            let fresher = best
                .get(n.node_id.as_str())
                .is_none_or(|(b, _)| n.last_seen_unix_ms > b.last_seen_unix_ms);
            if fresher {
                best.insert(&n.node_id, (n, endpoint));
            }
        }
    }
    best.into_iter()
        .map(|(id, (n, from))| MergedNode {
            node: n.clone(),
            from: from.to_string(),
            missing_at: serving[n.network.as_str()]
                .difference(&holders[id])
                .map(|e| e.to_string())
                .collect(),
        })
        .collect()
}

/// Merges the fleet views of several aggregators: per network, the view
/// with the highest fleet head (ties: the first aggregator's), with the
/// nodes only another aggregator has appended.
pub fn fleet(answers: &[(String, Vec<NetworkView>)]) -> Vec<NetworkView> {
    let mut merged: BTreeMap<String, NetworkView> = BTreeMap::new();
    for (_, views) in answers {
        for v in views {
            match merged.get_mut(&v.network) {
                None => {
                    merged.insert(v.network.clone(), v.clone());
                }
                Some(have) => {
                    let (mut keep, other) = if v.fleet_head > have.fleet_head {
                        (v.clone(), have.clone())
                    } else {
                        (have.clone(), v.clone())
                    };
                    for n in other.nodes {
                        if !keep.nodes.iter().any(|k| k.node_id == n.node_id) {
                            keep.nodes.push(n);
                        }
                    }
                    *have = keep;
                }
            }
        }
    }
    merged.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FleetNode;

    fn node(id: &str, network: &str, seen: i64) -> NodeSummary {
        NodeSummary {
            node_id: id.into(),
            network: network.into(),
            last_seen_unix_ms: seen,
            ..Default::default()
        }
    }

    #[test]
    fn every_node_once_the_freshest_report_and_a_mark_where_a_member_lacks_it() {
        let a = "https://agg-a:7443".to_string();
        let b = "https://agg-b:7443".to_string();
        let c = "https://agg-us:7443".to_string();
        let merged = nodes(&[
            (
                a.clone(),
                vec![node("n1", "eu", 100), node("n2", "eu", 100)],
            ),
            (b.clone(), vec![node("n1", "eu", 200)]),
            (c.clone(), vec![node("n9", "us", 50)]),
        ]);
        let got: Vec<(&str, i64, &str, Vec<String>)> = merged
            .iter()
            .map(|m| {
                (
                    m.node.node_id.as_str(),
                    m.node.last_seen_unix_ms,
                    m.from.as_str(),
                    m.missing_at.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("n1", 200, b.as_str(), vec![]),
                ("n2", 100, a.as_str(), vec![b.clone()]),
                ("n9", 50, c.as_str(), vec![]),
            ]
        );
    }

    #[test]
    fn a_network_from_two_members_is_the_one_further_ahead_with_every_node() {
        let view = |head: u64, ids: &[&str]| NetworkView {
            network: "eu".into(),
            fleet_head: head,
            nodes: ids
                .iter()
                .map(|i| FleetNode {
                    node_id: i.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let merged = fleet(&[
            ("a".into(), vec![view(10, &["n1", "n2"])]),
            ("b".into(), vec![view(12, &["n1"])]),
        ]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].fleet_head, 12);
        let ids: Vec<&str> = merged[0].nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["n1", "n2"]);
    }
}
