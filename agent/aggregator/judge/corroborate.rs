//! Corroboration: an agent's reorg or head regression waits for its
//! peers' reports, then gets its verdict from what they did (replaced the
//! same block, still hold it, never had it). What most of a network did is
//! one network finding that the nodes' findings name.

use super::*;

impl FleetState {
    /// Takes in an agent's stored reorg or regression: recent ones are
    /// evidence for the peers' (as they were before the restart), and one
    /// stored but never judged (the aggregator stopped while it waited for
    /// the peers; a judged one carries its network) is judged once the
    /// agents have had `CORROBORATE_MS` to reconnect. The receipt times are
    /// gone: what is restored counts as received at the start.
    pub(super) fn reload_report(
        &mut self,
        node: &str,
        view: &mut NodeView,
        network: &str,
        mut f: Finding,
    ) {
        let at = self.started_ms;
        let judged = !f.network.is_empty();
        // Still evidence: a recent report, or one that waits for its verdict.
        let recent = self.started_ms - f.opened_at_unix_ms <= CAUSE_JOINS_MS || !judged;
        match f.kind() {
            FindingKind::Reorg if recent => {
                view.reorgs_reported.push(reorg_report(&f, at));
                if judged && view.last_reorg.as_ref().is_none_or(|r| r.at_ms <= at) {
                    view.last_reorg = Some(ReorgSeen::of(at, &f));
                }
            }
            FindingKind::HeightRegression if recent => {
                view.regressed_ms = view.regressed_ms.max(Some(at));
            }
            _ => {}
        }
        if !judged {
            f.network = network.to_string();
            self.pending.push(Pending {
                node: node.to_string(),
                finding: f,
                at_ms: at,
            });
        }
    }

    /// Decides the reorgs and regressions whose peers have had time to
    /// report.
    pub(super) fn decide_pending(
        &mut self,
        now: i64,
        cfg: &FleetConfig,
        seen: &dyn Sightings,
        emits: &mut Vec<Emit>,
    ) {
        let (mut due, mut waiting): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|p| now - p.at_ms >= CORROBORATE_MS);
        // A regression that the same node's reorg followed is that reorg's
        // first half (the node went back, then built other blocks): it waits
        // for the reorg's verdict and takes it.
        let (regressions, reorgs): (Vec<Pending>, Vec<Pending>) = due
            .drain(..)
            .partition(|p| p.finding.kind() == FindingKind::HeightRegression);
        due = reorgs;
        for r in regressions {
            let followed = waiting.iter().any(|w| {
                w.node == r.node && w.finding.kind() == FindingKind::Reorg && w.at_ms >= r.at_ms
            });
            if followed {
                waiting.push(r);
            } else {
                due.push(r);
            }
        }
        self.pending = waiting;
        let reference: BTreeSet<String> = cfg.reference_nodes.iter().cloned().collect();
        for p in due {
            let Some(view) = self.nodes.get(&p.node) else {
                continue;
            };
            let net = view.network.clone();
            let mut f = p.finding;
            if f.kind() == FindingKind::HeightRegression {
                if let Some(r) = view
                    .last_reorg
                    .as_ref()
                    .filter(|r| r.at_ms >= p.at_ms && r.at_ms - p.at_ms <= 2 * CORROBORATE_MS)
                {
                    f.verdict = r.verdict as i32;
                    f.verdict_reason = format!(
                        "the first part of reorg {}: the node went back, then built other blocks",
                        r.id
                    );
                    f.cause_id = r.id.clone();
                    emits.push(Emit {
                        scope: p.node,
                        finding: f,
                        alert: false,
                    });
                    continue;
                }
            }
            let peers: Vec<(&str, &NodeView)> = self
                .nodes
                .iter()
                .filter(|(n, v)| {
                    *n != &p.node && v.network == net && !self.silent(n, now, cfg, seen)
                })
                .map(|(n, v)| (n.as_str(), v))
                .collect();
            let (from, to) = match f.kind() {
                FindingKind::Reorg => (f.fork_point.map_or(0, |x| x + 1), f.height),
                _ => (f.height, f.height),
            };
            let split = self
                .causes
                .get(&(net.clone(), FindingKind::Divergence as i32))
                .and_then(|cs| cs.iter().find(|c| c.from <= to && from <= c.to))
                .map(|c| c.id.clone());
            let judged = match (f.kind(), split) {
                (FindingKind::Reorg, Some(split)) => Judged {
                    verdict: Verdict::Network,
                    reason: format!(
                        "{} left one side of the split {split} for the other",
                        p.node
                    ),
                    nodes: vec![p.node.clone()],
                    compared: peers.len() + 1,
                    cause: Some(split),
                },
                (FindingKind::Reorg, None) => reorg_verdict(&p.node, &f, &peers, &reference),
                _ => regression_verdict(&p.node, &f, &peers, p.at_ms),
            };
            f.verdict = judged.verdict as i32;
            f.verdict_reason = judged.reason.clone();
            let alert = judged.verdict != Verdict::Network;
            if !alert {
                f.cause_id = match &judged.cause {
                    Some(c) => c.clone(),
                    None => self.cause(&net, &f, from, to, &judged, now, emits),
                };
            }
            if f.kind() == FindingKind::Reorg {
                if !alert {
                    self.join_earlier(&p.node, &net, &f, &judged, now, emits);
                }
                if let Some(v) = self.nodes.get_mut(&p.node) {
                    v.last_reorg = Some(ReorgSeen::of(p.at_ms, &f));
                }
            }
            emits.push(Emit {
                scope: p.node,
                finding: f,
                alert,
            });
        }
    }

    /// Peers that replaced the same block but were judged before the
    /// others reported (more than `CORROBORATE_MS` earlier) are judged
    /// again: their reorg joins the network finding `f` names. The alert
    /// they raised stays sent; the stored finding, queries and watchers get
    /// the verdict.
    #[allow(clippy::too_many_arguments)]
    fn join_earlier(
        &mut self,
        node: &str,
        net: &str,
        f: &Finding,
        judged: &Judged,
        now: i64,
        emits: &mut Vec<Emit>,
    ) {
        for (peer, v) in self.nodes.iter_mut() {
            if peer == node || v.network != net {
                continue;
            }
            let Some(seen) = v.last_reorg.as_mut() else {
                continue;
            };
            let same_block = seen.finding.fork_point == f.fork_point
                && seen.finding.replaced_hash == f.replaced_hash;
            if seen.verdict == Verdict::Network || !same_block || now - seen.at_ms > CAUSE_JOINS_MS
            {
                continue;
            }
            let mut again = seen.finding.clone();
            again.verdict = Verdict::Network as i32;
            again.verdict_reason = format!(
                "{}; judged again once the later nodes reported",
                judged.reason
            );
            again.cause_id = f.cause_id.clone();
            *seen = ReorgSeen::of(seen.at_ms, &again);
            emits.push(Emit {
                scope: peer.clone(),
                finding: again,
                alert: false,
            });
        }
    }

    /// The network finding a node's reorg or regression is part of: one
    /// that a peer's report opened lately over the same heights, else a new
    /// one, emitted and alerted.
    #[allow(clippy::too_many_arguments)]
    fn cause(
        &mut self,
        net: &str,
        f: &Finding,
        from: u64,
        to: u64,
        judged: &Judged,
        now: i64,
        emits: &mut Vec<Emit>,
    ) -> String {
        let key = (net.to_string(), f.kind);
        if let Some(c) = self
            .causes
            .get(&key)
            .and_then(|cs| cs.iter().find(|c| c.from <= to && from <= c.to))
        {
            return c.id.clone();
        }
        let scope = network_scope(net);
        let mut nf = f.clone();
        let nodes = judged.nodes.join(", ");
        match f.kind() {
            FindingKind::Reorg => {
                let fork = f.fork_point.map_or("none".to_string(), |x| x.to_string());
                nf.summary = format!(
                    "{net} reorganised: {} of {} nodes replaced block {} at height {from} (fork point {fork}): {nodes}",
                    judged.nodes.len(),
                    judged.compared,
                    short(&f.replaced_hash)
                );
                nf.id = self.id(
                    FindingKind::Reorg,
                    &scope,
                    format!("f{fork}:{}", short(&f.replaced_hash)),
                );
            }
            _ => {
                nf.summary = format!(
                    "{net} went back to height {from}: {} of {} nodes lowered their head at once: {nodes}",
                    judged.nodes.len(),
                    judged.compared
                );
                nf.id = self.id(FindingKind::HeightRegression, &scope, format!("h{from}"));
            }
        }
        nf.nodes = judged.nodes.clone();
        nf.cause_id = String::new();
        self.causes.entry(key).or_default().push(Cause {
            id: nf.id.clone(),
            from,
            to,
            at_ms: now,
        });
        let id = nf.id.clone();
        emits.push(Emit {
            scope,
            finding: nf,
            alert: true,
        });
        id
    }
}

/// A verdict with its reason, and the nodes that did the same.
struct Judged {
    verdict: Verdict,
    reason: String,
    /// The nodes (this one included) whose reports are the evidence.
    nodes: Vec<String>,
    /// How many nodes had something to compare at that height.
    compared: usize,
    /// The network finding it is part of, when one already speaks for it.
    cause: Option<String>,
}

/// Whose reorg this is. At the first replaced height `h`, the node held
/// `old` and now holds `new`; its peers either replaced `old` too, still
/// hold it, or never had it.
fn reorg_verdict(
    node: &str,
    f: &Finding,
    peers: &[(&str, &NodeView)],
    reference: &BTreeSet<String>,
) -> Judged {
    let h = f.fork_point.map_or(0, |x| x + 1);
    let old = &f.replaced_hash[..];
    let new = &f.new_hash[..];
    let had_old = |v: &NodeView| {
        v.recent.get(&h).is_some_and(|x| **x == *old)
            || v.given_up.get(&h).is_some_and(|x| **x == *old)
            || v.reorgs_reported.iter().any(|r| r.0 == h && r.1 == old)
    };
    let kept_old: Vec<&str> = peers
        .iter()
        .filter(|(_, v)| v.recent.get(&h).is_some_and(|x| **x == *old))
        .map(|(n, _)| *n)
        .collect();
    let mut replaced: Vec<String> = peers
        .iter()
        .filter(|(_, v)| had_old(v) && v.recent.get(&h).is_none_or(|x| **x != *old))
        .map(|(n, _)| n.to_string())
        .collect();
    replaced.push(node.to_string());
    replaced.sort();
    let on_new = peers
        .iter()
        .filter(|(_, v)| v.recent.get(&h).is_some_and(|x| **x == *new))
        .count();
    let compared = 1 + peers
        .iter()
        .filter(|(_, v)| v.recent.contains_key(&h))
        .count();
    let judged = |verdict, reason| Judged {
        verdict,
        reason,
        nodes: replaced.clone(),
        compared,
        cause: None,
    };
    if f.replaced_hash.is_empty() {
        return judged(
            Verdict::Unspecified,
            "the agent did not say which block was replaced".into(),
        );
    }
    if peers.is_empty() || compared == 1 {
        return judged(
            Verdict::Unspecified,
            format!("no other node of the network has height {h} to compare with"),
        );
    }
    let old_s = short(old);
    if let Some(r) = replaced
        .iter()
        .find(|n| n.as_str() != node && reference.contains(*n))
    {
        return judged(
            Verdict::Network,
            format!("the reference node {r} replaced block {old_s} at height {h} too"),
        );
    }
    if let Some(r) = kept_old.iter().find(|n| reference.contains(**n)) {
        return judged(
            Verdict::Node,
            format!("the reference node {r} still holds block {old_s} at height {h}: {node} left its chain"),
        );
    }
    if replaced.len() * 2 > compared {
        return judged(
            Verdict::Network,
            format!(
                "{} of {compared} nodes replaced block {old_s} at height {h}: {}",
                replaced.len(),
                replaced.join(", ")
            ),
        );
    }
    if replaced.len() == 1 && kept_old.is_empty() {
        return judged(
            Verdict::Node,
            format!(
                "{node} alone held block {old_s} at height {h}; {on_new} of the other {} nodes hold {} there: it left a side branch and rejoined the others",
                compared - 1,
                short(new)
            ),
        );
    }
    if !kept_old.is_empty() {
        return judged(
            Verdict::Node,
            format!(
                "{} of {compared} nodes still hold block {old_s} at height {h}: {node} left the chain they follow",
                kept_old.len()
            ),
        );
    }
    judged(
        Verdict::Node,
        format!(
            "only {} of {compared} nodes replaced block {old_s} at height {h}: {}",
            replaced.len(),
            replaced.join(", ")
        ),
    )
}

/// What a reorg report says was replaced: the first height and its old hash.
pub(super) fn reorg_report(f: &Finding, at_ms: i64) -> (u64, Vec<u8>, i64) {
    (
        f.fork_point.map_or(0, |x| x + 1),
        f.replaced_hash.clone(),
        at_ms,
    )
}

/// Whose head regression this is: most of the network's nodes going back
/// within `CORROBORATE_MS` of each other is the network's.
fn regression_verdict(node: &str, f: &Finding, peers: &[(&str, &NodeView)], at_ms: i64) -> Judged {
    let mut regressed: Vec<String> = peers
        .iter()
        .filter(|(_, v)| {
            v.regressed_ms
                .is_some_and(|t| (t - at_ms).abs() <= CORROBORATE_MS)
        })
        .map(|(n, _)| n.to_string())
        .collect();
    regressed.push(node.to_string());
    regressed.sort();
    let compared = peers.len() + 1;
    let nodes = regressed.clone();
    let (verdict, reason) = if peers.is_empty() {
        (
            Verdict::Unspecified,
            "no other node of the network to compare with".to_string(),
        )
    } else if regressed.len() * 2 > compared {
        (
            Verdict::Network,
            format!(
                "{} of {compared} nodes lowered their head at once: {}",
                regressed.len(),
                regressed.join(", ")
            ),
        )
    } else {
        let top = peers
            .iter()
            .filter_map(|(_, v)| v.height())
            .max()
            .unwrap_or(0);
        (
            Verdict::Node,
            format!(
                "{node} went back to height {} while the other nodes hold heads up to {top}",
                f.height
            ),
        )
    };
    Judged {
        verdict,
        reason,
        nodes,
        compared,
        cause: None,
    }
}
