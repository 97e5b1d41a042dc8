//! Validate: judges what Ingest saw. Checks linkage and height, detects
//! reorgs (depth and fork point), stalls, an unreachable node and syncing;
//! at the higher validation levels also each header's timestamp, fields and
//! hash. It writes headers, findings and status with their events in one atomic
//! store commit, then makes them durable. A finding opens once and resolves
//! once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Instrument;

use super::ingest::ChainStep;
use super::Ping;
use crate::chain::{ChainSource, Verification};
use crate::config::{HostConfig, ValidateConfig, ValidationLevel};
use crate::latency::Timings;
use crate::model::{hex, now_unix_ms, Header, NodeStatus};
use crate::proto::{self, event::Kind, FindingKind, FindingState, Severity};
use crate::store::local::{Commit, LocalStore};

/// Fewest RPC calls in the error window for a failure rate to count.
const RPC_ERROR_MIN_CALLS: u64 = 20;

/// How often the store's witness file is rewritten while events flow.
const WITNESS_EVERY: Duration = Duration::from_secs(5);

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
    checks: &dyn ChainSource,
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

#[derive(Message)]
#[rtype(result = "()")]
pub enum Observation {
    /// A successful poll: new headers (if any) and the node's status (if read).
    Polled {
        chain: Option<ChainStep>,
        status: Option<NodeStatus>,
        /// A status interval ended with this poll: its report goes out even
        /// when the status read failed (with the last status the node gave).
        status_due: bool,
    },
    /// The circuit breaker opened: the node stopped answering.
    Unreachable { error: String },
    /// The node reported a head that cannot be real; it was not stored.
    Implausible { why: String },
    /// A host probe sample.
    Host(proto::HostSample),
}

pub struct Validate {
    store: LocalStore,
    /// The chain's own header checks (levels `comprehensive` and `full`).
    checks: Arc<dyn ChainSource>,
    cfg: ValidateConfig,
    retain_headers: u64,
    timings: Timings,
    /// Calls and failed calls per status interval, newest last, over
    /// `rpc_error_window`.
    rpc_window: std::collections::VecDeque<(Instant, u64, u64)>,
    span: tracing::Span,
    /// Open findings by kind, as the store has them.
    open: HashMap<i32, proto::Finding>,
    head: Option<Header>,
    /// Set when the store was restored from a snapshot at start-up: the
    /// summary of the `store-recovered` finding to raise.
    recovered: Option<String>,
    /// When the store's witness file was last written.
    witness_at: Option<Instant>,
    host_cfg: HostConfig,
    host: Option<proto::HostSample>,
    /// Since when each host resource has been above its threshold.
    host_over: HashMap<i32, Instant>,
    last_advance: Instant,
    reachable: bool,
    status: NodeStatus,
    /// Below this many free bytes on the store's filesystem nothing is
    /// judged or written.
    min_free: u64,
    /// Since when (Unix ms), and with how few bytes free, writing paused.
    paused: Option<(i64, u64)>,
    /// Told when the store can no longer be written (the process exits).
    fatal: Option<tokio::sync::watch::Sender<Option<String>>>,
}

impl Validate {
    pub fn new(
        store: LocalStore,
        checks: Arc<dyn ChainSource>,
        cfg: ValidateConfig,
        retain_headers: u64,
        timings: Timings,
        span: tracing::Span,
    ) -> Validate {
        let mut v = Validate {
            store,
            checks,
            cfg,
            retain_headers,
            timings,
            rpc_window: std::collections::VecDeque::new(),
            span,
            open: HashMap::new(),
            head: None,
            recovered: None,
            witness_at: None,
            host_cfg: HostConfig::default(),
            host: None,
            host_over: HashMap::new(),
            last_advance: Instant::now(),
            reachable: true,
            status: NodeStatus::default(),
            min_free: 0,
            paused: None,
            fatal: None,
        };
        v.reload();
        v
    }

    /// (Re)reads what the store knows, so a restart neither re-opens nor
    /// forgets a finding.
    fn reload(&mut self) {
        match (self.store.open_findings(), self.store.head()) {
            (Ok(open), Ok(head)) => {
                self.open = open.into_iter().map(|f| (f.kind, f)).collect();
                self.reachable = !self.open.contains_key(&(FindingKind::Unreachable as i32));
                self.head = head;
            }
            (Err(e), _) | (_, Err(e)) => tracing::error!("cannot read the store: {e}"),
        }
        self.last_advance = Instant::now();
    }

    fn announce_level(&self) {
        let _g = self.span.enter();
        let level = self.cfg.level;
        if level == ValidationLevel::Full && !self.checks.can_verify() {
            tracing::warn!(
                level = level.label(),
                "this chain's source cannot recompute header hashes; level full checks what comprehensive does"
            );
        } else {
            tracing::info!(level = level.label(), "validation level");
        }
    }

    fn stall_after(&self) -> Duration {
        self.cfg
            .expected_block_time
            .mul_f64(self.cfg.stall_multiple)
    }

    fn open_finding(
        &mut self,
        kind: FindingKind,
        severity: Severity,
        summary: String,
        now_ms: i64,
    ) -> Option<proto::Finding> {
        if self.open.contains_key(&(kind as i32)) {
            return None;
        }
        let f = proto::Finding {
            id: format!("{}-{now_ms}", kind.label()),
            kind: kind as i32,
            severity: severity as i32,
            state: FindingState::Open as i32,
            height: self.head.as_ref().map_or(0, |h| h.height),
            opened_at_unix_ms: now_ms,
            summary,
            ..Default::default()
        };
        tracing::warn!(finding_kind = kind.label(), finding_id = %f.id, "finding opened: {}", f.summary);
        self.open.insert(kind as i32, f.clone());
        Some(f)
    }

    fn resolve_finding(&mut self, kind: FindingKind, now_ms: i64) -> Option<proto::Finding> {
        let mut f = self.open.remove(&(kind as i32))?;
        f.state = FindingState::Resolved as i32;
        f.resolved_at_unix_ms = now_ms;
        f.height = self.head.as_ref().map_or(f.height, |h| h.height);
        tracing::info!(finding_kind = kind.label(), finding_id = %f.id, "finding resolved: {}", f.summary);
        Some(f)
    }

    fn occurred(
        &self,
        kind: FindingKind,
        severity: Severity,
        height: u64,
        summary: String,
        now_ms: i64,
    ) -> proto::Finding {
        let f = proto::Finding {
            id: format!("{}-{height}-{now_ms}", kind.label()),
            kind: kind as i32,
            severity: severity as i32,
            state: FindingState::Occurred as i32,
            height,
            opened_at_unix_ms: now_ms,
            resolved_at_unix_ms: now_ms,
            summary,
            ..Default::default()
        };
        tracing::warn!(finding_kind = kind.label(), finding_id = %f.id, "finding: {}", f.summary);
        f
    }

    /// Judges new headers; fills `commit` with what to write.
    fn judge_chain(
        &mut self,
        step: ChainStep,
        commit: &mut Commit,
        now_ms: i64,
    ) -> Result<(), String> {
        let started = Instant::now();
        let count = step.headers.len() as u64;
        let result = self.judge_headers(step, commit, now_ms);
        if count > 0 {
            self.timings
                .validate
                .record_n(started.elapsed() / count as u32, count);
        }
        result
    }

    fn judge_headers(
        &mut self,
        step: ChainStep,
        commit: &mut Commit,
        now_ms: i64,
    ) -> Result<(), String> {
        let Some(first) = step.headers.first().cloned() else {
            return Ok(());
        };
        let old_head = self.head.clone();
        let mut findings = Vec::new();
        let standard = self.cfg.level >= ValidationLevel::Standard;
        if standard && !step.linked {
            findings.push(self.occurred(
                FindingKind::Linkage,
                Severity::Critical,
                first.height,
                format!(
                    "header {} does not link to the stored chain within {} blocks (parent {})",
                    first.height, self.cfg.max_reorg_depth, first.parent_hash
                ),
                now_ms,
            ));
        }
        for pair in step.headers.windows(2) {
            if pair[1].height != pair[0].height + 1 || pair[1].parent_hash != pair[0].hash {
                return Err(format!(
                    "ingest handed over unlinked headers at {} → {}",
                    pair[0].height, pair[1].height
                ));
            }
        }
        if let Some(old) = old_head.as_ref().filter(|_| standard) {
            if first.height <= old.height {
                // None when even the genesis block differs: a different chain.
                let fork_point = first.height.checked_sub(1);
                let replaced = self
                    .store
                    .header(first.height)
                    .map_err(|e| e.to_string())?
                    .is_some_and(|h| h.hash != first.hash);
                if replaced {
                    let depth = old.height - fork_point.map_or(0, |f| f + 1) + 1;
                    let fork =
                        fork_point.map_or("none (genesis differs)".to_string(), |f| f.to_string());
                    let mut f = self.occurred(
                        FindingKind::Reorg,
                        if depth >= 6 || fork_point.is_none() || self.checks.final_on_commit() {
                            Severity::Critical
                        } else {
                            Severity::Warning
                        },
                        old.height,
                        format!(
                            "{}reorg of depth {depth}: blocks {}..={} replaced, fork point {fork}, old head {} new head {}",
                            if self.checks.final_on_commit() { "committed blocks changed, which this chain's finality forbids: " } else { "" },
                            first.height,
                            old.height,
                            old.hash,
                            step.headers.last().map(|h| h.hash.to_string()).unwrap_or_default()
                        ),
                        now_ms,
                    );
                    f.fork_point = fork_point;
                    f.depth = Some(depth);
                    findings.push(f);
                }
            }
        }
        if self.cfg.level >= ValidationLevel::Comprehensive {
            let mut parent = self
                .store
                .header(first.height.saturating_sub(1))
                .map_err(|e| e.to_string())?
                .filter(|p| first.height > 0 && p.hash == first.parent_hash);
            for h in &step.headers {
                let problems = header_problems(
                    self.cfg.level,
                    self.checks.as_ref(),
                    h,
                    parent.as_ref(),
                    now_ms / 1000,
                    self.cfg.future_tolerance,
                );
                if !problems.is_empty() {
                    let critical = problems.iter().any(|p| p.critical);
                    let text: Vec<&str> = problems.iter().map(|p| p.text.as_str()).collect();
                    findings.push(self.occurred(
                        FindingKind::InvalidHeader,
                        if critical {
                            Severity::Critical
                        } else {
                            Severity::Warning
                        },
                        h.height,
                        format!("header {} ({}): {}", h.height, h.hash, text.join("; ")),
                        now_ms,
                    ));
                }
                parent = Some(h.clone());
            }
        }
        let new_head = step.headers.last().cloned().unwrap_or(first);
        if let Some(old) = &old_head {
            if new_head.height < old.height {
                commit.truncate_above = Some(new_head.height);
                findings.push(self.occurred(
                    FindingKind::HeightRegression,
                    Severity::Warning,
                    new_head.height,
                    format!("head went back from {} to {}", old.height, new_head.height),
                    now_ms,
                ));
            }
        }
        // Only a higher head counts as progress: a reorg at the same height
        // does not end a stall.
        if old_head
            .as_ref()
            .is_none_or(|old| new_head.height > old.height)
        {
            self.last_advance = Instant::now();
            if let Some(f) = self.resolve_finding(FindingKind::Stall, now_ms) {
                findings.push(f);
            }
        }
        commit
            .events
            .extend(step.headers.iter().map(|h| Kind::Header(h.to_proto())));
        commit.headers.extend(step.headers);
        self.head = Some(new_head);
        commit
            .events
            .extend(findings.iter().cloned().map(Kind::Finding));
        commit.findings.extend(findings);
        Ok(())
    }

    fn judge_status(&mut self, status: NodeStatus, commit: &mut Commit, now_ms: i64) {
        let mut findings = Vec::new();
        let syncing = status
            .syncing
            .filter(|_| self.cfg.level >= ValidationLevel::Standard);
        match syncing {
            Some(true) => findings.extend(self.open_finding(
                FindingKind::Syncing,
                Severity::Warning,
                match status.sync_highest_block {
                    Some(target) => format!("node is syncing towards block {target}"),
                    None => "node is syncing".into(),
                },
                now_ms,
            )),
            Some(false) => findings.extend(self.resolve_finding(FindingKind::Syncing, now_ms)),
            None => {}
        }
        if self.cfg.level >= ValidationLevel::Standard {
            match status.competing_tips.first() {
                Some(t) => findings.extend(self.open_finding(
                    FindingKind::CompetingTip,
                    Severity::Warning,
                    format!(
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
                    ),
                    now_ms,
                )),
                None => findings.extend(self.resolve_finding(FindingKind::CompetingTip, now_ms)),
            }
        }
        self.status = status;
        commit
            .events
            .extend(findings.iter().cloned().map(Kind::Finding));
        commit.findings.extend(findings);
        self.push_status(commit, now_ms);
    }

    /// Ends a reporting interval: summarises the timings, judges the RPC's
    /// speed and failures, and adds the status (and any finding) to `commit`.
    fn push_status(&mut self, commit: &mut Commit, now_ms: i64) {
        let rpc = self.timings.rpc.take();
        let mut findings = Vec::new();
        let slow = Duration::from_micros(rpc.all.p99_us);
        if rpc.all.count > 0 && slow > self.cfg.slow_rpc_p99 {
            let worst = rpc
                .methods
                .iter()
                .max_by_key(|m| m.latency.map_or(0, |l| l.p99_us))
                .map(|m| m.method.clone())
                .unwrap_or_default();
            findings.extend(self.open_finding(
                FindingKind::SlowRpc,
                Severity::Warning,
                format!(
                    "RPC p99 {} ms over {} calls (threshold {} ms); slowest method {worst}",
                    slow.as_millis(),
                    rpc.all.count,
                    self.cfg.slow_rpc_p99.as_millis()
                ),
                now_ms,
            ));
        } else if rpc.all.count > 0 {
            findings.extend(self.resolve_finding(FindingKind::SlowRpc, now_ms));
        }
        let now = Instant::now();
        self.rpc_window.push_back((now, rpc.all.count, rpc.errors));
        while self
            .rpc_window
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > self.cfg.rpc_error_window)
        {
            self.rpc_window.pop_front();
        }
        let (calls, errors) = self
            .rpc_window
            .iter()
            .fold((0, 0), |(c, e), (_, dc, de)| (c + dc, e + de));
        // An unreachable node has its own finding; this one is for a node
        // that answers, but not always.
        if self.reachable && calls >= RPC_ERROR_MIN_CALLS {
            let rate = errors as f64 / calls as f64;
            if rate > self.cfg.rpc_error_rate {
                findings.extend(self.open_finding(
                    FindingKind::RpcErrors,
                    Severity::Warning,
                    format!(
                        "{errors} of {calls} RPC calls failed in the last {} ({:.1} %, threshold {:.1} %)",
                        humantime::format_duration(self.cfg.rpc_error_window),
                        rate * 100.0,
                        self.cfg.rpc_error_rate * 100.0
                    ),
                    now_ms,
                ));
            } else {
                findings.extend(self.resolve_finding(FindingKind::RpcErrors, now_ms));
            }
        }
        commit
            .events
            .extend(findings.iter().cloned().map(Kind::Finding));
        commit.findings.extend(findings);
        let s = proto::NodeStatus {
            rpc_latency: Some(rpc.all),
            rpc_errors: rpc.errors,
            rpc_methods: rpc.methods,
            validate_latency: Some(self.timings.validate.take_summary()),
            round_trip: Some(self.timings.round_trip.take_summary()),
            ..self.status_proto()
        };
        commit.events.push(Kind::Status(s.clone()));
        commit.status = Some(s);
    }

    /// What the node's status is, without the interval's timings.
    fn status_proto(&self) -> proto::NodeStatus {
        proto::NodeStatus {
            head_height: self.head.as_ref().map_or(0, |h| h.height),
            head_hash: self
                .head
                .as_ref()
                .map(|h| h.hash.0.clone())
                .unwrap_or_default(),
            reachable: self.reachable,
            peers: self.status.peers,
            syncing: self.status.syncing,
            sync_highest_block: self.status.sync_highest_block,
            mempool_size: self.status.mempool,
            dropped_events: self.store.dropped_events(),
            host: self.host.clone(),
            ..Default::default()
        }
    }

    /// Commits and then flushes; the reply to the sender waits for both.
    fn write(&mut self, commit: Commit, ctx: &mut Context<Self>) -> ResponseActFuture<Self, ()> {
        let head = self.head.as_ref().map(|h| h.height);
        if commit.events.is_empty() && commit.headers.is_empty() && commit.status.is_none() {
            return Box::pin(actix::fut::ready(()));
        }
        match self.store.commit(commit, now_unix_ms()) {
            Ok(done) => {
                if done.dropped > 0 {
                    tracing::warn!(dropped = done.dropped, "outbox full: telemetry dropped");
                }
            }
            Err(e) => {
                self.write_failed("commit", &e, ctx);
                return Box::pin(actix::fut::ready(()));
            }
        }
        if let Some(h) = head {
            if let Err(e) = self.store.prune_headers(h, self.retain_headers) {
                tracing::warn!("header retention failed: {e}");
            }
        }
        let store = self.store.clone();
        let flush = async move { store.flush().await }.instrument(self.span.clone());
        Box::pin(flush.into_actor(self).map(|res, act, ctx| {
            let _g = act.span.clone().entered();
            if let Err(e) = res {
                act.write_failed("flush", &e, ctx);
                return;
            }
            if act.witness_at.is_none_or(|t| t.elapsed() >= WITNESS_EVERY) {
                act.witness_at = Some(Instant::now());
                if let Err(e) = act.store.write_witness() {
                    tracing::warn!("store witness not written: {e}");
                }
            }
        }))
    }

    fn check_stall(&mut self, ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        if self.cfg.level < ValidationLevel::Standard {
            return;
        }
        if !self.reachable || self.open.contains_key(&(FindingKind::Stall as i32)) {
            return;
        }
        // While the store is paused the head does not move: no stall of
        // the node's.
        if self.paused.is_some() {
            self.last_advance = Instant::now();
            return;
        }
        let waited = self.last_advance.elapsed();
        if waited < self.stall_after() {
            return;
        }
        let now_ms = now_unix_ms();
        let head = self
            .head
            .as_ref()
            .map(|h| format!("{} ({})", h.height, hex(&h.hash.0[..4.min(h.hash.0.len())])))
            .unwrap_or_else(|| "none".into());
        let summary = format!(
            "no new block for {}s (expected one every {}s); head {head}",
            waited.as_secs(),
            self.cfg.expected_block_time.as_secs_f64()
        );
        if let Some(f) = self.open_finding(FindingKind::Stall, Severity::Warning, summary, now_ms) {
            let commit = Commit {
                events: vec![Kind::Finding(f.clone())],
                findings: vec![f],
                ..Default::default()
            };
            let write = self.write(commit, ctx);
            ctx.spawn(write);
        }
    }
}

impl Validate {
    /// The host thresholds to judge samples by.
    pub fn host(mut self, cfg: HostConfig) -> Validate {
        self.host_cfg = cfg;
        self
    }

    /// Opens a host finding once a resource has stayed above its threshold
    /// for `host.sustain`, and resolves it when the resource is back below.
    fn judge_host(&mut self, sample: proto::HostSample, commit: &mut Commit, now_ms: i64) {
        let cfg = &self.host_cfg;
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
        let sustain = cfg.sustain;
        let mut findings = Vec::new();
        for (kind, what, value, limit, place) in checks {
            if f64::from(value) > limit {
                let since = *self
                    .host_over
                    .entry(kind as i32)
                    .or_insert_with(Instant::now);
                if since.elapsed() >= sustain {
                    findings.extend(self.open_finding(
                        kind,
                        Severity::Warning,
                        format!(
                            "{what} use {value:.1} %{place} above {limit} % for at least {}",
                            humantime::format_duration(sustain)
                        ),
                        now_ms,
                    ));
                }
            } else {
                self.host_over.remove(&(kind as i32));
                findings.extend(self.resolve_finding(kind, now_ms));
            }
        }
        self.host = Some(sample);
        commit
            .events
            .extend(findings.iter().cloned().map(Kind::Finding));
        commit.findings.extend(findings);
    }

    /// Pauses below `min_free` free bytes; a store that failed on the disk
    /// is reported on `fatal`.
    pub fn disk(
        mut self,
        min_free: u64,
        fatal: tokio::sync::watch::Sender<Option<String>>,
    ) -> Validate {
        self.min_free = min_free;
        self.fatal = Some(fatal);
        self
    }

    /// Whether the store's filesystem has room to write. While it has not,
    /// observations are dropped unjudged: the store's head does not move,
    /// so the node's blocks of that time are read again afterwards. When
    /// room returns, `commit` gets the `store-paused` finding.
    fn room(&mut self, commit: &mut Commit, now_ms: i64) -> bool {
        let free = self.store.free_bytes().unwrap_or(u64::MAX);
        if free < self.min_free {
            if self.paused.is_none() {
                self.paused = Some((now_ms, free));
                tracing::error!(
                    free_bytes = free,
                    min_free_bytes = self.min_free,
                    "only {free} bytes free on {}: the store is not written until there are {} (store.min_free_bytes)",
                    self.store.dir().display(),
                    self.min_free
                );
            }
            return false;
        }
        if let Some((since, low)) = self.paused.take() {
            let f = self.occurred(
                FindingKind::StorePaused,
                Severity::Critical,
                self.head.as_ref().map_or(0, |h| h.height),
                format!(
                    "the store was not written for {}s: only {low} bytes were free on {} (store.min_free_bytes {}); the node's blocks of that time were read again",
                    (now_ms - since) / 1000,
                    self.store.dir().display(),
                    self.min_free
                ),
                now_ms,
            );
            commit.events.push(Kind::Finding(f.clone()));
            commit.findings.push(f);
        }
        true
    }

    /// A write failed. One that failed on the disk leaves sled's store
    /// unwritable until it is reopened, so the agent exits for systemd to
    /// restart it; any other failure restarts this actor.
    fn write_failed(&self, what: &str, e: &crate::store::StoreError, ctx: &mut Context<Self>) {
        match (&self.fatal, e.is_io()) {
            (Some(fatal), true) => {
                let msg = format!("store {what} failed on the disk: {e}; exiting so that a restart reopens the store");
                tracing::error!("{msg}");
                fatal.send_replace(Some(msg));
            }
            _ => {
                tracing::error!("store {what} failed: {e}; validate restarts");
                ctx.stop();
            }
        }
    }

    /// Raises `store-recovered` once the actor runs.
    pub fn recovered(mut self, summary: Option<String>) -> Validate {
        self.recovered = summary;
        self
    }
}

impl Actor for Validate {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.announce_level();
        if let Some(summary) = self.recovered.take() {
            let _g = self.span.clone().entered();
            let height = self.head.as_ref().map_or(0, |h| h.height);
            let f = self.occurred(
                FindingKind::StoreRecovered,
                Severity::Critical,
                height,
                summary,
                now_unix_ms(),
            );
            let commit = Commit {
                events: vec![Kind::Finding(f.clone())],
                findings: vec![f],
                ..Default::default()
            };
            let write = self.write(commit, ctx);
            ctx.wait(write);
        }
        let every = (self.cfg.expected_block_time / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        ctx.run_interval(every, |act, ctx| act.check_stall(ctx));
    }
}

impl Supervised for Validate {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        tracing::warn!("validate restarting; reloading state from the store");
        self.reload();
    }
}

/// A reloaded `[validate]` table, `store.retain_headers` and the `[host]`
/// thresholds, all live.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure {
    pub cfg: ValidateConfig,
    pub retain_headers: u64,
    pub host: HostConfig,
}

impl Handler<Reconfigure> for Validate {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, _: &mut Context<Self>) {
        self.cfg = msg.cfg;
        self.retain_headers = msg.retain_headers;
        self.host_cfg = msg.host;
        self.announce_level();
    }
}

/// Writes a snapshot of the store into `dir`. No commit happens while it
/// runs (the mailbox waits), so the snapshot holds exactly the events up to
/// its last seq. The snapshot is then reported as an event.
#[derive(Message)]
#[rtype(result = "Result<crate::store::snapshot::Written, String>")]
pub struct TakeSnapshot {
    pub dir: std::path::PathBuf,
    pub node_id: String,
}

impl Handler<TakeSnapshot> for Validate {
    type Result = ResponseFuture<Result<crate::store::snapshot::Written, String>>;

    fn handle(&mut self, msg: TakeSnapshot, ctx: &mut Context<Self>) -> Self::Result {
        use crate::store::snapshot::Meta;
        let meta = Meta {
            store: "agent".into(),
            node_id: Some(msg.node_id),
            last_seq: Some(self.store.last_seq()),
            head_height: self.head.as_ref().map(|h| h.height),
        };
        let store = self.store.clone();
        let dir = msg.dir;
        let started = Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = async move {
            tokio::task::spawn_blocking(move || store.snapshot(meta, &dir))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
        };
        ctx.wait(work.into_actor(self).map(move |result, act, ctx| {
            if let Ok(w) = &result {
                let taken = proto::SnapshotTaken {
                    file: w
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    bytes: w.bytes,
                    duration_ms: started.elapsed().as_millis() as u64,
                    sha256: w.sha256.clone(),
                    last_seq: w.manifest.last_seq.unwrap_or(0),
                    head_height: w.manifest.head_height.unwrap_or(0),
                };
                let commit = Commit {
                    events: vec![Kind::Snapshot(taken)],
                    ..Default::default()
                };
                let write = act.write(commit, ctx);
                ctx.spawn(write);
            }
            let _ = tx.send(result);
        }));
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err("the validate actor stopped".into()))
        })
    }
}

impl Handler<Ping> for Validate {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

impl Handler<Observation> for Validate {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, obs: Observation, ctx: &mut Context<Self>) -> Self::Result {
        let _g = self.span.clone().entered();
        let now_ms = now_unix_ms();
        let mut commit = Commit::default();
        if !self.room(&mut commit, now_ms) {
            return Box::pin(actix::fut::ready(()));
        }
        match obs {
            Observation::Polled {
                chain,
                status,
                status_due,
            } => {
                if !self.reachable {
                    self.reachable = true;
                    if let Some(f) = self.resolve_finding(FindingKind::Unreachable, now_ms) {
                        commit.events.push(Kind::Finding(f.clone()));
                        commit.findings.push(f);
                    }
                    // The node was away; a stall clock running through the outage
                    // would blame the node for our blindness.
                    self.last_advance = Instant::now();
                }
                if let Some(f) = self.resolve_finding(FindingKind::ImplausibleHead, now_ms) {
                    commit.events.push(Kind::Finding(f.clone()));
                    commit.findings.push(f);
                }
                if let Some(step) = chain {
                    if let Err(e) = self.judge_chain(step, &mut commit, now_ms) {
                        tracing::error!("{e}");
                        return Box::pin(actix::fut::ready(()));
                    }
                }
                match status {
                    Some(status) => self.judge_status(status, &mut commit, now_ms),
                    // The aggregator learns of a shorter chain from the status head.
                    None if status_due || commit.truncate_above.is_some() => {
                        self.push_status(&mut commit, now_ms)
                    }
                    None => {}
                }
            }
            Observation::Host(sample) => self.judge_host(sample, &mut commit, now_ms),
            Observation::Implausible { why } => {
                if let Some(f) = self.open_finding(
                    FindingKind::ImplausibleHead,
                    Severity::Critical,
                    why,
                    now_ms,
                ) {
                    commit.events.push(Kind::Finding(f.clone()));
                    commit.findings.push(f);
                }
            }
            Observation::Unreachable { error } => {
                self.reachable = false;
                if let Some(f) = self.open_finding(
                    FindingKind::Unreachable,
                    Severity::Critical,
                    format!("node RPC unreachable: {error}"),
                    now_ms,
                ) {
                    commit.events.push(Kind::Finding(f.clone()));
                    commit.findings.push(f);
                }
                self.push_status(&mut commit, now_ms);
            }
        }
        self.write(commit, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::ethereum::{parse_block, EthereumSource};
    use crate::chain::rpc::JsonRpcClient;

    fn anvil_header() -> (EthereumSource, Header) {
        let source = EthereumSource::new(JsonRpcClient::new(
            "http://127.0.0.1:1",
            Duration::from_secs(1),
            1 << 20,
            crate::latency::RpcTimings::new(),
        ));
        let block = serde_json::from_str(include_str!("../chain/testdata/anvil-prague-block.json"))
            .unwrap();
        (source, parse_block(&block).unwrap())
    }

    #[test]
    fn timestamps_are_checked_against_the_clock_and_the_parent() {
        let (source, h) = anvil_header();
        let tolerance = Duration::from_secs(15);
        let check = |level, parent: Option<&Header>, now: i64| {
            header_problems(level, &source, &h, parent, now, tolerance)
        };
        let t = h.timestamp;
        let mut parent = h.clone();
        assert!(check(ValidationLevel::Full, Some(&parent), t).is_empty());
        // Equal to the parent's is allowed; one second later is not.
        parent.timestamp = t + 1;
        let p = check(ValidationLevel::Comprehensive, Some(&parent), t);
        assert_eq!(p.len(), 1);
        assert!(p[0].text.contains("before its parent's"), "{p:?}");
        assert!(!p[0].critical);
        // 15 s ahead of the clock is tolerated, 16 s is not.
        assert!(check(ValidationLevel::Comprehensive, None, t - 15).is_empty());
        let p = check(ValidationLevel::Comprehensive, None, t - 16);
        assert!(
            p[0].text.contains("16s ahead of this host's clock"),
            "{p:?}"
        );
        // Levels below comprehensive look at none of it.
        assert!(check(ValidationLevel::Standard, Some(&parent), t - 100).is_empty());
    }

    #[test]
    fn only_level_full_recomputes_the_hash() {
        let (source, mut h) = anvil_header();
        h.hash.0[0] ^= 1;
        assert!(header_problems(
            ValidationLevel::Comprehensive,
            &source,
            &h,
            None,
            h.timestamp,
            Duration::from_secs(15)
        )
        .is_empty());
        let p = header_problems(
            ValidationLevel::Full,
            &source,
            &h,
            None,
            h.timestamp,
            Duration::from_secs(15),
        );
        assert_eq!(p.len(), 1);
        assert!(
            p[0].critical && p[0].text.contains("does not match"),
            "{p:?}"
        );
    }
}
