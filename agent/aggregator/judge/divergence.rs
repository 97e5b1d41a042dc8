//! Divergence: each node's hash against the network's canonical one (the
//! reference nodes', else the strict majority's), and a split when no hash
//! has a majority: one network finding naming every group.

use super::*;

/// A disagreement must last this long before it opens: long enough for a
/// reorg to reach every node.
const DIVERGENCE_GRACE_MS: i64 = 2_000;

impl FleetState {
    pub(super) fn judge_divergence(
        &mut self,
        net: &str,
        active: &[String],
        now: i64,
        cfg: &FleetConfig,
        emits: &mut Vec<Emit>,
    ) {
        let reference: BTreeSet<&str> = cfg.reference_nodes.iter().map(String::as_str).collect();
        let found: Vec<(String, Option<Divergence>)> = {
            let mut canon = Canon::new(self, active, &reference);
            active
                .iter()
                .map(|n| (n.clone(), compare(self, n, &mut canon)))
                .collect()
        };
        // A split: no majority at the height some node diverges at. One
        // network finding names every group; the nodes' own findings are
        // linked to it.
        let split = found
            .iter()
            .filter_map(|(_, d)| d.as_ref())
            .filter(|d| !d.canonical_known)
            .min_by_key(|d| d.height)
            .map(|d| (d.height, d.groups.clone(), d.fork_point));
        let split_key = (network_scope(net), FindingKind::Divergence as i32);
        match (&split, self.open.contains_key(&split_key)) {
            (Some((height, groups, fork)), false) => {
                let first = *self
                    .pending_divergence
                    .entry(split_key.0.clone())
                    .or_insert(now);
                if now - first >= DIVERGENCE_GRACE_MS {
                    self.pending_divergence.remove(&split_key.0);
                    let names: Vec<String> = groups
                        .iter()
                        .map(|g| format!("{} ({})", g.node_ids.join(", "), short(&g.hash)))
                        .collect();
                    let fork_text = fork.map_or("unknown".to_string(), |f| f.to_string());
                    let mut f = new_finding(
                        FindingKind::Divergence,
                        Severity::Critical,
                        net,
                        format!(
                            "{net} is split at height {height} into {} groups with no majority: {}; fork point {fork_text}",
                            groups.len(),
                            names.join(" against ")
                        ),
                        Verdict::Network,
                        format!(
                            "no hash at height {height} is held by more than half of the {} nodes that have it",
                            groups.iter().map(|g| g.node_ids.len()).sum::<usize>()
                        ),
                        now,
                        *height,
                    );
                    f.fork_point = *fork;
                    f.groups = groups.clone();
                    f.nodes = groups.iter().flat_map(|g| g.node_ids.clone()).collect();
                    f.id = self.id(
                        FindingKind::Divergence,
                        &split_key.0,
                        format!("f{fork_text}"),
                    );
                    // Nodes that leave one side for the other are part of it.
                    self.causes
                        .entry((net.to_string(), FindingKind::Divergence as i32))
                        .or_default()
                        .push(Cause {
                            id: f.id.clone(),
                            from: fork.map_or(0, |x| x + 1),
                            to: *height,
                            at_ms: now,
                        });
                    self.raise(emits, split_key.clone(), f, true);
                }
            }
            (None, true) => {
                if let Some(f) = self.open.remove(&split_key) {
                    self.touch_cause(net, &f.id, now);
                    emits.push(resolved(&split_key.0, f, now, true));
                }
            }
            (None, false) => {
                self.pending_divergence.remove(&split_key.0);
            }
            (Some(_), true) => {
                if let Some(id) = self.open.get(&split_key).map(|f| f.id.clone()) {
                    self.touch_cause(net, &id, now);
                }
            }
        }
        let split_id = self.open.get(&split_key).map(|f| f.id.clone());

        for (node, verdict) in found {
            let key = (node.clone(), FindingKind::Divergence as i32);
            let open_cause = self.open.get(&key).map(|f| f.cause_id.clone());
            let Some(d) = verdict else {
                self.pending_divergence.remove(&node);
                if let Some(f) = self.open.remove(&key) {
                    let alert = f.cause_id.is_empty();
                    emits.push(resolved(&node, f, now, alert));
                }
                continue;
            };
            // A node finding that belonged to a split that has ended is
            // closed with it; the node's own divergence, if it stays, opens
            // afresh with its own verdict.
            if let Some(cause) = open_cause {
                if !cause.is_empty() && split_id.as_deref() != Some(cause.as_str()) {
                    if let Some(f) = self.open.remove(&key) {
                        emits.push(resolved(&node, f, now, false));
                    }
                }
                continue;
            }
            let linked = !d.canonical_known;
            if linked && split_id.is_none() {
                // The split's network finding opens first.
                continue;
            }
            let first = *self.pending_divergence.entry(node.clone()).or_insert(now);
            if !linked && now - first < DIVERGENCE_GRACE_MS {
                continue;
            }
            self.pending_divergence.remove(&node);
            let (verdict, reason) = if d.canonical_known {
                (
                    Verdict::Node,
                    format!(
                        "{} of {} nodes agree on {} at height {}; {node} holds {}",
                        d.canonical_size,
                        d.compared,
                        hex(&d.canonical_hash),
                        d.height,
                        hex(&d.own_hash)
                    ),
                )
            } else {
                (
                    Verdict::Network,
                    format!("no majority at height {}: the network is split", d.height),
                )
            };
            let fork = d
                .fork_point
                .map_or("unknown".to_string(), |f| f.to_string());
            let mut f = new_finding(
                FindingKind::Divergence,
                Severity::Critical,
                net,
                format!(
                    "{node} diverges from {net} at height {}: fork point {fork}, depth {}",
                    d.height, d.depth
                ),
                verdict,
                reason,
                now,
                d.height,
            );
            f.fork_point = d.fork_point;
            f.depth = Some(d.depth);
            f.groups = d.groups;
            f.id = self.id(FindingKind::Divergence, &node, format!("f{fork}"));
            if linked {
                f.cause_id = split_id.clone().unwrap_or_default();
            }
            self.raise(emits, key, f, !linked);
        }
    }

    /// Keeps an open (or just resolved) split joinable for another
    /// `CAUSE_JOINS_MS`.
    fn touch_cause(&mut self, net: &str, id: &str, now: i64) {
        let key = (net.to_string(), FindingKind::Divergence as i32);
        for c in self.causes.entry(key).or_default() {
            if c.id == id {
                c.at_ms = now;
            }
        }
    }
}

/// How one node stands against the canonical chain.
struct Divergence {
    height: u64,
    own_hash: Vec<u8>,
    canonical_hash: Vec<u8>,
    canonical_known: bool,
    canonical_size: usize,
    compared: usize,
    fork_point: Option<u64>,
    depth: u64,
    groups: Vec<HashGroup>,
}

/// The canonical hash per height of one network, computed once per height
/// per evaluation: the reference nodes' if any of them has one, else the
/// strict majority's; None on a tie or when nobody has the height. Also the
/// two highest heads, so "the others' top" costs nothing per node.
struct Canon<'a> {
    st: &'a FleetState,
    nodes: &'a [String],
    reference: &'a BTreeSet<&'a str>,
    memo: HashMap<u64, Option<Hash>>,
    /// (height, node) of the highest and second-highest heads.
    tops: [Option<(u64, &'a str)>; 2],
}

impl<'a> Canon<'a> {
    fn new(st: &'a FleetState, nodes: &'a [String], reference: &'a BTreeSet<&'a str>) -> Self {
        let mut tops: [Option<(u64, &str)>; 2] = [None, None];
        for n in nodes {
            let Some(h) = st.nodes[n].height() else {
                continue;
            };
            if tops[0].is_none_or(|(t, _)| h > t) {
                tops[1] = tops[0];
                tops[0] = Some((h, n.as_str()));
            } else if tops[1].is_none_or(|(t, _)| h > t) {
                tops[1] = Some((h, n.as_str()));
            }
        }
        Canon {
            st,
            nodes,
            reference,
            memo: HashMap::new(),
            tops,
        }
    }

    /// The highest head among the nodes other than `node`.
    fn others_top(&self, node: &str) -> Option<u64> {
        match self.tops {
            [Some((_, n)), second] if n == node => second.map(|(h, _)| h),
            [first, _] => first.map(|(h, _)| h),
        }
    }

    fn at(&mut self, height: u64) -> Option<Hash> {
        if let Some(c) = self.memo.get(&height) {
            return c.clone();
        }
        let holders: Vec<(&str, &Hash)> = self
            .nodes
            .iter()
            .filter_map(|n| {
                self.st.nodes[n]
                    .recent
                    .get(&height)
                    .map(|h| (n.as_str(), h))
            })
            .collect();
        let refs: Vec<&Hash> = holders
            .iter()
            .filter(|(n, _)| self.reference.contains(n))
            .map(|(_, h)| *h)
            .collect();
        let pool: Vec<&Hash> = if refs.is_empty() {
            holders.iter().map(|(_, h)| *h).collect()
        } else {
            refs
        };
        let mut counts: BTreeMap<&Hash, usize> = BTreeMap::new();
        for h in &pool {
            *counts.entry(h).or_default() += 1;
        }
        let best = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .and_then(|(best, n)| {
                let tied = counts.values().filter(|c| *c == n).count() > 1;
                (!tied).then(|| (*best).clone())
            });
        self.memo.insert(height, best.clone());
        best
    }
}

fn compare(st: &FleetState, node: &str, canon: &mut Canon<'_>) -> Option<Divergence> {
    let view = &st.nodes[node];
    let own_top = view.height()?;
    let height = own_top.min(canon.others_top(node)?);
    let own_hash = view.recent.get(&height)?.clone();
    let canonical = canon.at(height);
    if canonical.as_ref() == Some(&own_hash) {
        return None;
    }
    let holders: Vec<&String> = canon
        .nodes
        .iter()
        .filter(|n| st.nodes[*n].recent.contains_key(&height))
        .collect();
    if holders.len() < 2
        || holders
            .iter()
            .all(|n| st.nodes[*n].recent.get(&height) == Some(&own_hash))
    {
        return None;
    }
    let mut groups: BTreeMap<Hash, Vec<String>> = BTreeMap::new();
    for n in &holders {
        groups
            .entry(st.nodes[*n].recent[&height].clone())
            .or_default()
            .push((*n).clone());
    }
    let canonical_hash = canonical.as_deref().map(<[u8]>::to_vec).unwrap_or_default();
    let canonical_size = groups.get(&canonical_hash[..]).map_or(0, Vec::len);
    // The fork point: the highest height below where this node still agrees.
    let fork_point = view
        .recent
        .range(..height)
        .rev()
        .find(|(h, hash)| canon.at(**h).as_ref() == Some(*hash))
        .map(|(h, _)| *h);
    Some(Divergence {
        height,
        own_hash: own_hash.to_vec(),
        canonical_known: canonical.is_some(),
        canonical_size,
        compared: holders.len(),
        fork_point,
        depth: own_top - fork_point.unwrap_or(0),
        groups: groups
            .into_iter()
            .map(|(hash, node_ids)| HashGroup {
                canonical: canonical.as_ref() == Some(&hash),
                hash: hash.to_vec(),
                node_ids,
            })
            .collect(),
        canonical_hash,
    })
}
