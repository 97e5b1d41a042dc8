//! The agent's rules, with no I/O. A state, an input (what a poll saw, a
//! host sample, a clock tick) and the time, given by the caller, make the
//! new state and an `Outcome`: the headers to store and the findings to
//! open, resolve or record. `Validate` feeds it and writes what it returns;
//! the tests here try every rule without a node, a store or a clock.
//!
//! A finding opens once and resolves once: the open ones are part of the
//! state, and a restart rebuilds the state from what the store holds
//! (`State::restore`).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::chain::{Cause, ChainSource, Verification};
use crate::config::{HostConfig, ValidateConfig, ValidationLevel};
use crate::latency::RpcInterval;
use crate::model::{hex, Header, NodeStatus};
use crate::proto::{self, event::Kind, Finding, FindingKind, FindingState, Severity, Verdict};

/// Fewest RPC calls in the error window for a failure rate to count.
const RPC_ERROR_MIN_CALLS: u64 = 20;

/// New canonical headers since the store's head, ascending and linked to
/// each other. `linked` is false when the walk-back hit `max_depth` without
/// reaching a header the store agrees with.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainStep {
    pub headers: Vec<Header>,
    pub linked: bool,
}

/// The chain's own checks of one header, for levels `comprehensive` and
/// `full`. Every chain source has them; tests use a chain without any.
pub trait HeaderChecks {
    fn check_fields(&self, h: &Header) -> Vec<String>;
    fn verify(&self, h: &Header) -> Verification;
    /// Blocks, once committed, can never change (CometBFT, TON, Algorand).
    fn final_on_commit(&self) -> bool;
}

impl<T: ChainSource + ?Sized> HeaderChecks for T {
    fn check_fields(&self, h: &Header) -> Vec<String> {
        ChainSource::check_fields(self, h)
    }
    fn verify(&self, h: &Header) -> Verification {
        ChainSource::verify(self, h)
    }
    fn final_on_commit(&self) -> bool {
        ChainSource::final_on_commit(self)
    }
}

/// One thing wrong with a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub text: String,
    /// The header cannot be what the chain holds (its hash does not match).
    pub critical: bool,
}

/// What levels `comprehensive` and `full` find wrong with one header.
/// `parent` is the header below it when known; `now_s` this host's clock.
pub fn header_problems(
    level: ValidationLevel,
    checks: &(impl HeaderChecks + ?Sized),
    h: &Header,
    parent: Option<&Header>,
    now_s: i64,
    future_tolerance: Duration,
) -> Vec<Problem> {
    let mut out = Vec::new();
    if level < ValidationLevel::Comprehensive {
        return out;
    }
    let warn = |text: String| Problem {
        text,
        critical: false,
    };
    let ahead = h.timestamp - now_s;
    if ahead > future_tolerance.as_secs() as i64 {
        out.push(warn(format!(
            "timestamp {} is {ahead}s ahead of this host's clock (tolerance {}s)",
            h.timestamp,
            future_tolerance.as_secs()
        )));
    }
    if let Some(p) = parent.filter(|p| p.timestamp > h.timestamp) {
        out.push(warn(format!(
            "timestamp {} is before its parent's ({})",
            h.timestamp, p.timestamp
        )));
    }
    out.extend(checks.check_fields(h).into_iter().map(warn));
    if level >= ValidationLevel::Full {
        match checks.verify(h) {
            Verification::Mismatch { computed } => out.push(Problem {
                text: format!("served hash does not match its contents, which hash to {computed}"),
                critical: true,
            }),
            Verification::Unreadable(e) => out.push(warn(format!("hash not recomputable: {e}"))),
            Verification::Invalid(e) => out.push(Problem {
                text: e,
                critical: true,
            }),
            Verification::Match | Verification::NotSupported => {}
        }
    }
    out
}

/// What the rules are configured with.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub validate: ValidateConfig,
    pub host: HostConfig,
    /// How often Ingest polls the node.
    pub poll_interval: Duration,
}

impl Rules {
    fn stall_after(&self) -> Duration {
        self.validate
            .expected_block_time
            .mul_f64(self.validate.stall_multiple)
    }

    /// How often the caller should send `Input::Tick`.
    pub fn tick_every(&self) -> Duration {
        (self.validate.expected_block_time / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// A gap this long between two ticks means the agent did not run.
    pub fn pause_after(&self) -> Duration {
        (self.poll_interval.max(self.tick_every()) * 4).max(Duration::from_secs(2))
    }

    /// How the host probe finds the node's process, when it is told.
    fn node_process(&self) -> Option<String> {
        match (&self.host.node_pid_file, &self.host.node_process) {
            (Some(file), _) => Some(format!("host.node_pid_file {}", file.display())),
            (None, Some(name)) => Some(format!("host.node_process {name}")),
            (None, None) => None,
        }
    }
}

/// The time of an input, read by the caller: the wall clock for what
/// findings say, a monotonic clock (milliseconds from any start) for how
/// long things took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall_ms: i64,
    pub mono_ms: u64,
}

/// One input to the rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A poll succeeded: new headers (if any) and the node's status (if
    /// read). `status_due` ends a status interval even without a status.
    Polled {
        chain: Option<ChainStep>,
        status: Option<NodeStatus>,
        status_due: bool,
    },
    /// The circuit breaker opened: the node stopped answering.
    Unreachable { error: String, cause: Cause },
    /// The node reported a head that cannot be real; it was not stored.
    Implausible { why: String },
    /// A host probe sample.
    Host(proto::HostSample),
    /// The clock: stalls and the agent's own pauses are judged on it.
    Tick,
}

/// What the rules decided: events in the order they happened, and what
/// the store must change with them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub events: Vec<Kind>,
    /// Headers to (re)write in the height index.
    pub headers: Vec<Header>,
    /// Drop stored headers above this height (the node's chain got shorter).
    pub truncate_above: Option<u64>,
    /// The new set of retracted headers, when it changed.
    pub retracted: Option<Vec<Header>>,
    /// A status interval ends here: call `Judge::end_interval`.
    pub status_due: bool,
}

impl Outcome {
    fn finding(&mut self, f: Finding) {
        self.events.push(Kind::Finding(f));
    }

    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.events.iter().filter_map(|e| match e {
            Kind::Finding(f) => Some(f),
            _ => None,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.headers.is_empty()
            && self.truncate_above.is_none()
            && self.retracted.is_none()
    }
}

/// Whether the store may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    Write,
    /// Too little free space; `newly` on the first input that found it so.
    Paused {
        newly: bool,
    },
}

/// Everything the rules remember between inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// Open findings by kind.
    open: BTreeMap<i32, Finding>,
    head: Option<Header>,
    /// The stored chain's top `max_reorg_depth + 1` headers.
    recent: BTreeMap<u64, Header>,
    /// Headers above the head of a branch the node gave up when its head
    /// went lower: a block that arrives at one of these heights with
    /// another hash is a reorg, one with the same hash takes it back.
    retracted: BTreeMap<u64, Header>,
    /// When the head last rose (monotonic ms).
    last_advance_ms: u64,
    last_tick_ms: Option<u64>,
    reachable: bool,
    status: NodeStatus,
    host: Option<proto::HostSample>,
    /// Since when each host resource has been above its threshold.
    host_over: BTreeMap<i32, u64>,
    /// Calls and failed calls per status interval, newest last.
    rpc_window: VecDeque<(u64, u64, u64)>,
    /// Since when (wall ms), and with how few bytes free, writing paused.
    paused: Option<(i64, u64)>,
}

impl Default for State {
    /// A new store's: nothing seen, the node taken as reachable.
    fn default() -> State {
        State::restore(
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Now {
                wall_ms: 0,
                mono_ms: 0,
            },
        )
    }
}

impl State {
    /// The state as a restart finds it: the open findings, the stored top
    /// of the chain and the retracted headers the store holds; clocks
    /// start at `now`.
    pub fn restore(
        open: Vec<Finding>,
        recent: Vec<Header>,
        retracted: Vec<Header>,
        now: Now,
    ) -> State {
        let open: BTreeMap<i32, Finding> = open.into_iter().map(|f| (f.kind, f)).collect();
        let strip = |h: Header| (h.height, Header { raw: None, ..h });
        let recent: BTreeMap<u64, Header> = recent.into_iter().map(strip).collect();
        State {
            reachable: !open.contains_key(&(FindingKind::Unreachable as i32)),
            open,
            head: recent.values().next_back().cloned(),
            recent,
            retracted: retracted.into_iter().map(strip).collect(),
            last_advance_ms: now.mono_ms,
            last_tick_ms: None,
            status: NodeStatus::default(),
            host: None,
            host_over: BTreeMap::new(),
            rpc_window: VecDeque::new(),
            paused: None,
        }
    }

    pub fn head(&self) -> Option<&Header> {
        self.head.as_ref()
    }

    pub fn is_open(&self, kind: FindingKind) -> bool {
        self.open.contains_key(&(kind as i32))
    }
}

/// The rules and the state they keep.
pub struct Judge {
    pub rules: Rules,
    pub state: State,
}

impl Judge {
    pub fn new(rules: Rules, state: State) -> Judge {
        Judge { rules, state }
    }

    fn head_height(&self) -> u64 {
        self.state.head.as_ref().map_or(0, |h| h.height)
    }

    fn open(
        &mut self,
        kind: FindingKind,
        severity: Severity,
        summary: String,
        now: Now,
        out: &mut Outcome,
    ) -> bool {
        if self.state.open.contains_key(&(kind as i32)) {
            return false;
        }
        let f = Finding {
            id: format!("{}-{}", kind.label(), now.wall_ms),
            kind: kind as i32,
            severity: severity as i32,
            state: FindingState::Open as i32,
            height: self.head_height(),
            opened_at_unix_ms: now.wall_ms,
            summary,
            ..Default::default()
        };
        out.finding(f.clone());
        self.state.open.insert(kind as i32, f);
        true
    }

    /// Sets the verdict of the finding just opened, in the outcome and in
    /// the state.
    fn give_verdict(
        &mut self,
        kind: FindingKind,
        verdict: Verdict,
        reason: String,
        out: &mut Outcome,
    ) {
        if let Some(Kind::Finding(f)) = out.events.last_mut() {
            f.verdict = verdict as i32;
            f.verdict_reason = reason.clone();
        }
        if let Some(f) = self.state.open.get_mut(&(kind as i32)) {
            f.verdict = verdict as i32;
            f.verdict_reason = reason;
        }
    }

    fn resolve(&mut self, kind: FindingKind, now: Now, out: &mut Outcome) {
        if let Some(mut f) = self.state.open.remove(&(kind as i32)) {
            f.state = FindingState::Resolved as i32;
            f.resolved_at_unix_ms = now.wall_ms;
            f.height = self.state.head.as_ref().map_or(f.height, |h| h.height);
            out.finding(f);
        }
    }

    fn occurred(
        kind: FindingKind,
        severity: Severity,
        height: u64,
        summary: String,
        now: Now,
    ) -> Finding {
        Finding {
            id: format!("{}-{height}-{}", kind.label(), now.wall_ms),
            kind: kind as i32,
            severity: severity as i32,
            state: FindingState::Occurred as i32,
            height,
            opened_at_unix_ms: now.wall_ms,
            resolved_at_unix_ms: now.wall_ms,
            summary,
            ..Default::default()
        }
    }

    /// Judges one input. `checks` are the chain's own header checks.
    pub fn step(
        &mut self,
        input: Input,
        now: Now,
        checks: &(impl HeaderChecks + ?Sized),
    ) -> Result<Outcome, String> {
        let mut out = Outcome::default();
        match input {
            Input::Polled {
                chain,
                status,
                status_due,
            } => {
                if !self.state.reachable {
                    self.state.reachable = true;
                    self.resolve(FindingKind::Unreachable, now, &mut out);
                    // The node was away; a stall clock running through the
                    // outage would blame the node for our blindness.
                    self.state.last_advance_ms = now.mono_ms;
                }
                self.resolve(FindingKind::ImplausibleHead, now, &mut out);
                if let Some(step) = chain {
                    self.chain(step, now, checks, &mut out)?;
                }
                let has_status = status.is_some();
                if let Some(status) = status {
                    self.status(status, now, &mut out);
                }
                // The aggregator learns of a shorter chain from the status head.
                out.status_due = has_status || status_due || out.truncate_above.is_some();
            }
            Input::Unreachable { error, cause } => {
                self.state.reachable = false;
                let (verdict, reason) = self.unreachable_verdict(cause);
                let summary = format!("node RPC unreachable: {error}");
                if self.open(
                    FindingKind::Unreachable,
                    Severity::Critical,
                    summary,
                    now,
                    &mut out,
                ) {
                    self.give_verdict(FindingKind::Unreachable, verdict, reason, &mut out);
                }
                out.status_due = true;
            }
            Input::Implausible { why } => {
                self.open(
                    FindingKind::ImplausibleHead,
                    Severity::Critical,
                    why,
                    now,
                    &mut out,
                );
            }
            Input::Host(sample) => self.host(sample, now, &mut out),
            Input::Tick => self.tick(now, &mut out),
        }
        Ok(out)
    }

    /// Whose fault an unreachable RPC is, from how it failed and whether
    /// the host probe sees the node's process.
    fn unreachable_verdict(&self, cause: Cause) -> (Verdict, String) {
        let process = self.rules.node_process();
        let running = process
            .as_ref()
            .and(self.state.host.as_ref())
            .map(|h| h.node_rss_bytes.is_some());
        let p = process.unwrap_or_default();
        match (cause, running) {
            (Cause::Denied(code), _) => (
                Verdict::MonitoringPath,
                format!("the node answered HTTP {code}: it refuses the agent's credentials (source.auth)"),
            ),
            (_, Some(false)) => (
                Verdict::Node,
                format!("the node's process is not running (the host probe finds none by {p})"),
            ),
            (Cause::Refused, Some(true)) => (
                Verdict::Node,
                format!("the node's process runs ({p}) but nothing accepts connections at its RPC address: its RPC is off or listens elsewhere"),
            ),
            (Cause::TimedOut, Some(true)) => (
                Verdict::Node,
                format!("the node's process runs ({p}) but its RPC does not answer in time"),
            ),
            (Cause::Other, Some(true)) => (
                Verdict::MonitoringPath,
                format!("the node's process runs ({p}); the RPC failed between the agent and the node"),
            ),
            (_, None) => (
                Verdict::MonitoringPath,
                "the agent cannot tell a stopped node from a broken path to it: set host.node_process or host.node_pid_file so it can see whether the node runs".into(),
            ),
        }
    }

    /// The header the rules last saw at `height`: on the stored chain, or
    /// on a branch the node gave up.
    fn seen(&self, height: u64) -> Option<&Header> {
        self.state
            .recent
            .get(&height)
            .or_else(|| self.state.retracted.get(&height))
    }

    /// Judges new headers.
    fn chain(
        &mut self,
        step: ChainStep,
        now: Now,
        checks: &(impl HeaderChecks + ?Sized),
        out: &mut Outcome,
    ) -> Result<(), String> {
        let Some(first) = step.headers.first().cloned() else {
            return Ok(());
        };
        for pair in step.headers.windows(2) {
            if pair[1].height != pair[0].height + 1 || pair[1].parent_hash != pair[0].hash {
                return Err(format!(
                    "ingest handed over unlinked headers at {} → {}",
                    pair[0].height, pair[1].height
                ));
            }
        }
        let cfg = &self.rules.validate;
        let standard = cfg.level >= ValidationLevel::Standard;
        let old_head = self.state.head.clone();
        let new_head = step.headers.last().cloned().unwrap_or(first.clone());
        let mut findings = Vec::new();
        if standard && !step.linked {
            findings.push(Self::occurred(
                FindingKind::Linkage,
                Severity::Critical,
                first.height,
                format!(
                    "header {} does not link to the stored chain within {} blocks (parent {})",
                    first.height, cfg.max_reorg_depth, first.parent_hash
                ),
                now,
            ));
        }

        // A reorg: the lowest new header whose height was seen with another
        // hash, on the stored chain or on a branch given up before.
        let replaced = step.headers.iter().filter(|_| standard).find_map(|h| {
            let seen = self.seen(h.height).filter(|s| s.hash != h.hash)?;
            Some((seen.clone(), h.clone()))
        });
        let retracted_before = self.state.retracted.clone();
        if let Some((old, new)) = &replaced {
            let old_top = old_head.as_ref().map_or(0, |h| h.height).max(
                self.state
                    .retracted
                    .keys()
                    .next_back()
                    .copied()
                    .unwrap_or(0),
            );
            // None when even the genesis block differs: a different chain.
            let fork_point = new.height.checked_sub(1);
            let depth = old_top - fork_point.map_or(0, |f| f + 1) + 1;
            let fork = fork_point.map_or("none (genesis differs)".to_string(), |f| f.to_string());
            let final_on_commit = checks.final_on_commit();
            let lower = match &old_head {
                Some(o) if new_head.height < o.height => format!(
                    "; the new head is {} blocks lower than the old",
                    o.height - new_head.height
                ),
                _ => String::new(),
            };
            let mut f = Self::occurred(
                FindingKind::Reorg,
                if depth >= 6 || fork_point.is_none() || final_on_commit {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                old_top,
                format!(
                    "{}reorg of depth {depth}: blocks {}..={old_top} replaced, fork point {fork}, old head {} new head {} ({}){lower}",
                    if final_on_commit { "committed blocks changed, which this chain's finality forbids: " } else { "" },
                    new.height,
                    old_head.as_ref().map(|h| format!("{} ({})", h.height, h.hash)).unwrap_or_default(),
                    new_head.height,
                    new_head.hash,
                ),
                now,
            );
            f.fork_point = fork_point;
            f.depth = Some(depth);
            f.replaced_hash = old.hash.0.clone();
            f.new_hash = new.hash.0.clone();
            findings.push(f);
            // Every block the node gave up is accounted for by this reorg.
            self.state.retracted.clear();
        }

        if cfg.level >= ValidationLevel::Comprehensive {
            let mut parent = first
                .height
                .checked_sub(1)
                .and_then(|p| self.state.recent.get(&p))
                .filter(|p| p.hash == first.parent_hash)
                .cloned();
            for h in &step.headers {
                let problems = header_problems(
                    cfg.level,
                    checks,
                    h,
                    parent.as_ref(),
                    now.wall_ms / 1000,
                    cfg.future_tolerance,
                );
                if !problems.is_empty() {
                    let critical = problems.iter().any(|p| p.critical);
                    let text: Vec<&str> = problems.iter().map(|p| p.text.as_str()).collect();
                    findings.push(Self::occurred(
                        FindingKind::InvalidHeader,
                        if critical {
                            Severity::Critical
                        } else {
                            Severity::Warning
                        },
                        h.height,
                        format!("header {} ({}): {}", h.height, h.hash, text.join("; ")),
                        now,
                    ));
                }
                parent = Some(h.clone());
            }
        }

        if let Some(old) = &old_head {
            if new_head.height < old.height {
                out.truncate_above = Some(new_head.height);
                let above = self.state.recent.split_off(&(new_head.height + 1));
                if replaced.is_none() {
                    findings.push(Self::occurred(
                        FindingKind::HeightRegression,
                        Severity::Warning,
                        new_head.height,
                        format!("head went back from {} to {}", old.height, new_head.height),
                        now,
                    ));
                    // Kept until the node shows what stands at these heights.
                    self.state.retracted.extend(above);
                }
            }
        }
        // Heights the head has reached again were taken back at the same
        // hash (or replaced, which the reorg above counted).
        self.state.retracted.retain(|h, _| *h > new_head.height);
        if self.state.retracted != retracted_before {
            out.retracted = Some(self.state.retracted.values().cloned().collect());
        }

        // Only a higher head counts as progress: a reorg at the same height
        // does not end a stall.
        if old_head
            .as_ref()
            .is_none_or(|old| new_head.height > old.height)
        {
            self.state.last_advance_ms = now.mono_ms;
            self.resolve_into(FindingKind::Stall, now, &mut findings);
        }
        for h in &step.headers {
            self.state.recent.insert(
                h.height,
                Header {
                    raw: None,
                    ..h.clone()
                },
            );
        }
        // Only headers within the reorg depth of the head can still be replaced.
        let floor = new_head
            .height
            .saturating_sub(self.rules.validate.max_reorg_depth);
        self.state.recent = self.state.recent.split_off(&floor);
        self.state.head = Some(Header {
            raw: None,
            ..new_head
        });
        out.events
            .extend(step.headers.iter().map(|h| Kind::Header(h.to_proto())));
        out.headers.extend(step.headers);
        for f in findings {
            out.finding(f);
        }
        Ok(())
    }

    fn resolve_into(&mut self, kind: FindingKind, now: Now, findings: &mut Vec<Finding>) {
        let mut out = Outcome::default();
        self.resolve(kind, now, &mut out);
        findings.extend(out.findings().cloned());
    }

    fn status(&mut self, status: NodeStatus, now: Now, out: &mut Outcome) {
        let standard = self.rules.validate.level >= ValidationLevel::Standard;
        match status.syncing.filter(|_| standard) {
            Some(true) => {
                let summary = match status.sync_highest_block {
                    Some(target) => format!("node is syncing towards block {target}"),
                    None => "node is syncing".into(),
                };
                self.open(FindingKind::Syncing, Severity::Warning, summary, now, out);
            }
            Some(false) => self.resolve(FindingKind::Syncing, now, out),
            None => {}
        }
        if standard {
            match status.competing_tips.first() {
                Some(t) => {
                    let summary = format!(
                        "competing tip {} at height {} ({} on a branch of {} block{} beside the active chain){}",
                        t.hash,
                        t.height,
                        t.status,
                        t.branch_len,
                        if t.branch_len == 1 { "" } else { "s" },
                        match status.competing_tips.len() {
                            1 => String::new(),
                            n => format!(", and {} more", n - 1),
                        }
                    );
                    self.open(
                        FindingKind::CompetingTip,
                        Severity::Warning,
                        summary,
                        now,
                        out,
                    );
                }
                None => self.resolve(FindingKind::CompetingTip, now, out),
            }
        }
        self.state.status = status;
    }

    /// Ends a status interval: judges the RPC's speed and failures over
    /// `rpc`, the interval's calls, and adds the status event. The caller
    /// fills in what only it knows (its own timings, dropped events).
    pub fn end_interval(
        &mut self,
        rpc: RpcInterval,
        now: Now,
        out: &mut Outcome,
    ) -> proto::NodeStatus {
        let cfg = self.rules.validate.clone();
        let slow = Duration::from_micros(rpc.all.p99_us);
        if rpc.all.count > 0 && slow > cfg.slow_rpc_p99 {
            let worst = rpc
                .methods
                .iter()
                .max_by_key(|m| m.latency.map_or(0, |l| l.p99_us))
                .map(|m| m.method.clone())
                .unwrap_or_default();
            let summary = format!(
                "RPC p99 {} ms over {} calls (threshold {} ms); slowest method {worst}",
                slow.as_millis(),
                rpc.all.count,
                cfg.slow_rpc_p99.as_millis()
            );
            self.open(FindingKind::SlowRpc, Severity::Warning, summary, now, out);
        } else if rpc.all.count > 0 {
            self.resolve(FindingKind::SlowRpc, now, out);
        }
        let window = &mut self.state.rpc_window;
        window.push_back((now.mono_ms, rpc.all.count, rpc.errors));
        let span = cfg.rpc_error_window.as_millis() as u64;
        while window
            .front()
            .is_some_and(|(t, _, _)| now.mono_ms.saturating_sub(*t) > span)
        {
            window.pop_front();
        }
        let (calls, errors) = window.iter().fold((0u64, 0u64), |(c, e), (_, dc, de)| {
            (c.saturating_add(*dc), e.saturating_add(*de))
        });
        // An unreachable node has its own finding; this one is for a node
        // that answers, but not always.
        if self.state.reachable && calls >= RPC_ERROR_MIN_CALLS {
            let rate = errors as f64 / calls as f64;
            if rate > cfg.rpc_error_rate {
                let summary = format!(
                    "{errors} of {calls} RPC calls failed in the last {} ({:.1} %, threshold {:.1} %)",
                    humantime::format_duration(cfg.rpc_error_window),
                    rate * 100.0,
                    cfg.rpc_error_rate * 100.0
                );
                self.open(FindingKind::RpcErrors, Severity::Warning, summary, now, out);
            } else {
                self.resolve(FindingKind::RpcErrors, now, out);
            }
        }
        let head = self.state.head.as_ref();
        let s = proto::NodeStatus {
            head_height: head.map_or(0, |h| h.height),
            head_hash: head.map(|h| h.hash.0.clone()).unwrap_or_default(),
            reachable: self.state.reachable,
            peers: self.state.status.peers,
            syncing: self.state.status.syncing,
            sync_highest_block: self.state.status.sync_highest_block,
            mempool_size: self.state.status.mempool,
            host: self.state.host.clone(),
            rpc_latency: Some(rpc.all),
            rpc_errors: rpc.errors,
            rpc_methods: rpc.methods,
            ..Default::default()
        };
        out.status_due = false;
        s
    }

    /// Opens a host finding once a resource has stayed above its threshold
    /// for `host.sustain`, and resolves it when the resource is back below.
    fn host(&mut self, sample: proto::HostSample, now: Now, out: &mut Outcome) {
        let cfg = self.rules.host.clone();
        let checks = [
            (
                FindingKind::HostCpu,
                "CPU",
                sample.cpu_percent,
                cfg.cpu_percent,
                String::new(),
            ),
            (
                FindingKind::HostMemory,
                "memory",
                sample.memory_percent,
                cfg.memory_percent,
                String::new(),
            ),
            (
                FindingKind::HostDisk,
                "disk",
                sample.disk_percent,
                cfg.disk_percent,
                format!(" ({})", sample.disk_path),
            ),
        ];
        let sustain = cfg.sustain.as_millis() as u64;
        for (kind, what, value, limit, place) in checks {
            if f64::from(value) > limit {
                let since = *self
                    .state
                    .host_over
                    .entry(kind as i32)
                    .or_insert(now.mono_ms);
                if now.mono_ms.saturating_sub(since) >= sustain {
                    let summary = format!(
                        "{what} use {value:.1} %{place} above {limit} % for at least {}",
                        humantime::format_duration(cfg.sustain)
                    );
                    self.open(kind, Severity::Warning, summary, now, out);
                }
            } else {
                self.state.host_over.remove(&(kind as i32));
                self.resolve(kind, now, out);
            }
        }
        self.state.host = Some(sample);
    }

    /// The clock: a gap since the last tick longer than `pause_after` means
    /// the agent itself did not run, which is recorded and not counted
    /// against the node; then the stall rule.
    fn tick(&mut self, now: Now, out: &mut Outcome) {
        if let Some(last) = self.state.last_tick_ms.replace(now.mono_ms) {
            let gap = now.mono_ms.saturating_sub(last);
            if gap > self.rules.pause_after().as_millis() as u64 {
                self.state.last_advance_ms = self
                    .state
                    .last_advance_ms
                    .saturating_add(gap)
                    .min(now.mono_ms);
                for since in self.state.host_over.values_mut() {
                    *since = since.saturating_add(gap).min(now.mono_ms);
                }
                let mut f = Self::occurred(
                    FindingKind::AgentPaused,
                    Severity::Warning,
                    self.head_height(),
                    format!(
                        "the agent did not run for {:.1}s (its clock jumped between two checks {}ms apart); that time does not count against the node",
                        gap as f64 / 1000.0,
                        self.rules.tick_every().as_millis()
                    ),
                    now,
                );
                f.verdict = Verdict::MonitoringPath as i32;
                f.verdict_reason = "the agent was suspended, stopped or not scheduled (a paused VM, SIGSTOP, an overloaded host): it saw nothing of its node for that time".into();
                out.finding(f);
            }
        }
        self.stall(now, out);
    }

    fn stall(&mut self, now: Now, out: &mut Outcome) {
        if self.rules.validate.level < ValidationLevel::Standard
            || !self.state.reachable
            || self.state.is_open(FindingKind::Stall)
        {
            return;
        }
        // While the store is paused the head does not move: no stall of
        // the node's.
        if self.state.paused.is_some() {
            self.state.last_advance_ms = now.mono_ms;
            return;
        }
        let waited = Duration::from_millis(now.mono_ms.saturating_sub(self.state.last_advance_ms));
        if waited < self.rules.stall_after() {
            return;
        }
        let head = self
            .state
            .head
            .as_ref()
            .map(|h| format!("{} ({})", h.height, hex(&h.hash.0[..4.min(h.hash.0.len())])))
            .unwrap_or_else(|| "none".into());
        let summary = format!(
            "no new block for {}s (expected one every {}s); head {head}",
            waited.as_secs(),
            self.rules.validate.expected_block_time.as_secs_f64()
        );
        self.open(FindingKind::Stall, Severity::Warning, summary, now, out);
    }

    /// Whether the store's filesystem, with `free` bytes, has room for
    /// writes (`min_free`). While it has not, inputs go unjudged: the
    /// store's head does not move, so the node's blocks of that time are
    /// read again afterwards. When room returns, `out` gets the
    /// `store-paused` finding.
    pub fn room(
        &mut self,
        free: u64,
        min_free: u64,
        dir: &str,
        now: Now,
        out: &mut Outcome,
    ) -> Room {
        if free < min_free {
            let newly = self.state.paused.is_none();
            if newly {
                self.state.paused = Some((now.wall_ms, free));
            }
            return Room::Paused { newly };
        }
        if let Some((since, low)) = self.state.paused.take() {
            out.finding(Self::occurred(
                FindingKind::StorePaused,
                Severity::Critical,
                self.head_height(),
                format!(
                    "the store was not written for {}s: only {low} bytes were free on {dir} (store.min_free_bytes {min_free}); the node's blocks of that time were read again",
                    (now.wall_ms - since) / 1000,
                ),
                now,
            ));
        }
        Room::Write
    }

    /// The store was restored from a snapshot at start-up.
    pub fn recovered(&mut self, summary: String, now: Now, out: &mut Outcome) {
        out.finding(Self::occurred(
            FindingKind::StoreRecovered,
            Severity::Critical,
            self.head_height(),
            summary,
            now,
        ));
    }
}

#[cfg(test)]
mod tests;
