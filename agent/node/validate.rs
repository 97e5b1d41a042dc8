//! Validate: the shell around the agent's rules (`judge`). It feeds them
//! what Ingest saw, host samples and a clock, with the time read here, and
//! hands what they decide to the store writer (`writer::StoreWriter`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Instrument;

use super::judge::{Input, Judge, Now, Outcome, Room, Rules, State};
use super::writer::StoreWriter;
use super::Ping;
use crate::chain::ChainSource;
use crate::config::{HostConfig, ValidateConfig, ValidationLevel};
use crate::latency::Timings;
use crate::model::now_unix_ms;
use crate::proto::{self, event::Kind, FindingState};
use crate::store::local::{Commit, LocalStore};
use crate::store::StoreError;

/// What Ingest and the host probe saw, for the rules to judge.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Observation(pub Input);

pub struct Validate {
    judge: Judge,
    writer: StoreWriter,
    /// The chain's own header checks (levels `comprehensive` and `full`).
    checks: Arc<dyn ChainSource>,
    timings: Timings,
    span: tracing::Span,
    /// The monotonic clock's zero.
    epoch: Instant,
    /// Set when the store was restored from a snapshot at start-up: the
    /// summary of the `store-recovered` finding to raise.
    recovered: Option<String>,
    /// Below this many free bytes on the store's filesystem nothing is
    /// judged or written.
    min_free: u64,
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
        let rules = Rules {
            validate: cfg,
            ..Rules::default()
        };
        let mut v = Validate {
            judge: Judge::new(rules, State::default()),
            writer: StoreWriter::new(store, retain_headers),
            checks,
            timings,
            span,
            epoch: Instant::now(),
            recovered: None,
            min_free: 0,
        };
        v.reload();
        v
    }

    fn now(&self) -> Now {
        Now {
            wall_ms: now_unix_ms(),
            mono_ms: self.epoch.elapsed().as_millis() as u64,
        }
    }

    /// (Re)builds the rules' state from what the store holds, so a restart
    /// neither re-opens nor forgets a finding, nor a branch the node gave up.
    fn reload(&mut self) {
        let store = self.writer.store();
        let depth = self.judge.rules.validate.max_reorg_depth;
        let read = || -> Result<State, StoreError> {
            let top = store.head()?.map_or(0, |h| h.height);
            Ok(State::restore(
                store.open_findings()?,
                store.headers_from(top.saturating_sub(depth))?,
                store.retracted()?,
                self.now(),
            ))
        };
        match read() {
            Ok(state) => self.judge.state = state,
            Err(e) => tracing::error!("cannot read the store: {e}"),
        }
    }

    /// The host thresholds to judge samples by.
    pub fn host(mut self, cfg: HostConfig) -> Validate {
        self.judge.rules.host = cfg;
        self
    }

    /// How often Ingest polls: a clock gap of several polls means the agent
    /// itself did not run.
    pub fn poll_interval(mut self, every: Duration) -> Validate {
        self.judge.rules.poll_interval = every;
        self
    }

    /// Pauses below `min_free` free bytes; a store that failed on the disk
    /// is reported on `fatal`.
    pub fn disk(
        mut self,
        min_free: u64,
        fatal: tokio::sync::watch::Sender<Option<String>>,
    ) -> Validate {
        self.min_free = min_free;
        self.writer.exit_on_disk_failure(fatal);
        self
    }

    /// Raises `store-recovered` once the actor runs.
    pub fn recovered(mut self, summary: Option<String>) -> Validate {
        self.recovered = summary;
        self
    }

    fn announce_level(&self) {
        let _g = self.span.enter();
        let level = self.judge.rules.validate.level;
        if level == ValidationLevel::Full && !self.checks.can_verify() {
            tracing::warn!(
                level = level.label(),
                "this chain's source cannot recompute header hashes; level full checks what comprehensive does"
            );
        } else {
            tracing::info!(level = level.label(), "validation level");
        }
    }

    /// Whether the store's filesystem has room to write; see `Judge::room`.
    fn room(&mut self, now: Now, out: &mut Outcome) -> bool {
        let free = self.writer.store().free_bytes().unwrap_or(u64::MAX);
        let dir = self.writer.store().dir().display().to_string();
        match self.judge.room(free, self.min_free, &dir, now, out) {
            Room::Write => true,
            Room::Paused { newly } => {
                if newly {
                    tracing::error!(
                        free_bytes = free,
                        min_free_bytes = self.min_free,
                        "only {free} bytes free on {dir}: the store is not written until there are {} (store.min_free_bytes)",
                        self.min_free
                    );
                }
                false
            }
        }
    }

    /// Judges `input` and writes what comes of it.
    fn judge(&mut self, input: Input, ctx: &mut Context<Self>) -> ResponseActFuture<Self, ()> {
        let _g = self.span.clone().entered();
        let now = self.now();
        let mut out = Outcome::default();
        if !self.room(now, &mut out) {
            return Box::pin(actix::fut::ready(()));
        }
        let headers = match &input {
            Input::Polled { chain: Some(c), .. } => c.headers.len() as u32,
            _ => 0,
        };
        let started = Instant::now();
        match self.judge.step(input, now, self.checks.as_ref()) {
            // What the room check raised comes first.
            Ok(mut o) => {
                o.events.splice(0..0, out.events);
                out = o;
            }
            Err(e) => {
                tracing::error!("{e}");
                return Box::pin(actix::fut::ready(()));
            }
        }
        if headers > 0 {
            self.timings
                .validate
                .record_n(started.elapsed() / headers, u64::from(headers));
        }
        let status = out.status_due.then(|| {
            let rpc = self.timings.rpc.take();
            let s = self.judge.end_interval(rpc, now, &mut out);
            let store = self.writer.store();
            // This status's own seq is not in the backlog it reports.
            let last = store.last_seq();
            proto::NodeStatus {
                validate_latency: Some(self.timings.validate.take_summary()),
                round_trip: Some(self.timings.round_trip.take_summary()),
                dropped_events: store.dropped_events(),
                outbox_bytes: store.outbox_bytes(),
                outbox_quota_bytes: store.quota_bytes(),
                deliveries: store
                    .deliveries()
                    .into_iter()
                    .map(|d| proto::Delivery {
                        backlog: last.saturating_sub(d.acked),
                        aggregator: d.aggregator,
                        acked_seq: d.acked,
                        connected: d.connected,
                    })
                    .collect(),
                ..s
            }
        });
        if let Some(s) = status {
            out.events.push(Kind::Status(s));
        }
        self.write(out, ctx)
    }

    /// Logs each finding, commits, then flushes; the reply to the sender
    /// waits for both.
    fn write(&mut self, out: Outcome, ctx: &mut Context<Self>) -> ResponseActFuture<Self, ()> {
        if out.is_empty() {
            return Box::pin(actix::fut::ready(()));
        }
        for f in out.findings() {
            let kind = f.kind().label();
            match f.state() {
                FindingState::Open => {
                    tracing::warn!(finding_kind = kind, finding_id = %f.id, "finding opened: {}", f.summary)
                }
                FindingState::Resolved => {
                    tracing::info!(finding_kind = kind, finding_id = %f.id, "finding resolved: {}", f.summary)
                }
                _ => {
                    tracing::warn!(finding_kind = kind, finding_id = %f.id, "finding: {}", f.summary)
                }
            }
        }
        let commit = Commit {
            findings: out.findings().cloned().collect(),
            status: out.events.iter().rev().find_map(|e| match e {
                Kind::Status(s) => Some(s.clone()),
                _ => None,
            }),
            events: out.events,
            headers: out.headers,
            truncate_above: out.truncate_above,
            retracted: out.retracted,
        };
        let flush = match self.writer.commit(commit) {
            Ok(flush) => flush.instrument(self.span.clone()),
            Err((what, e)) => {
                if !self.writer.failed(what, &e) {
                    ctx.stop();
                }
                return Box::pin(actix::fut::ready(()));
            }
        };
        Box::pin(flush.into_actor(self).map(|res, act, ctx| {
            let _g = act.span.clone().entered();
            match res {
                Ok(()) => act.writer.flushed(),
                Err(e) => {
                    if !act.writer.failed("flush", &e) {
                        ctx.stop();
                    }
                }
            }
        }))
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let write = self.judge(Input::Tick, ctx);
        ctx.spawn(write);
    }
}

impl Actor for Validate {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.announce_level();
        if let Some(summary) = self.recovered.take() {
            let _g = self.span.clone().entered();
            let mut out = Outcome::default();
            self.judge.recovered(summary, self.now(), &mut out);
            let write = self.write(out, ctx);
            ctx.wait(write);
        }
        ctx.run_interval(self.judge.rules.tick_every(), |act, ctx| act.tick(ctx));
    }
}

impl Supervised for Validate {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        tracing::warn!("validate restarting; reloading state from the store");
        self.reload();
    }
}

/// A reloaded `[validate]` table, `store.retain_headers`, the poll interval
/// and the `[host]` thresholds, all live.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure {
    pub cfg: ValidateConfig,
    pub retain_headers: u64,
    pub host: HostConfig,
    pub poll_interval: Duration,
}

impl Handler<Reconfigure> for Validate {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, _: &mut Context<Self>) {
        self.judge.rules = Rules {
            validate: msg.cfg,
            host: msg.host,
            poll_interval: msg.poll_interval,
        };
        self.writer.retain(msg.retain_headers);
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
            last_seq: Some(self.writer.store().last_seq()),
            head_height: self.judge.state.head().map(|h| h.height),
        };
        let store = self.writer.store().clone();
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
                let out = Outcome {
                    events: vec![Kind::Snapshot(taken)],
                    ..Default::default()
                };
                let write = act.write(out, ctx);
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
        self.judge(obs.0, ctx)
    }
}
