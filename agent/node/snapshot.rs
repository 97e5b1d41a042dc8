//! Snapshot: on a schedule (and on demand) has Validate write a snapshot of
//! the store, then applies retention. Validate does the writing because it
//! is the store's only writer: while it writes the snapshot no commit can
//! slip in, so the snapshot holds exactly the events up to its last seq.

use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;
use tracing::Instrument;

use super::validate::{TakeSnapshot, Validate};
use super::Ping;
use crate::config::SnapshotConfig;
use crate::store::snapshot::{self, Written};

pub struct Snapshots {
    validate: Addr<Validate>,
    cfg: SnapshotConfig,
    dir: PathBuf,
    node_id: String,
    span: tracing::Span,
    schedule: Option<SpawnHandle>,
}

impl Snapshots {
    pub fn new(
        validate: Addr<Validate>,
        cfg: SnapshotConfig,
        dir: PathBuf,
        node_id: String,
        span: tracing::Span,
    ) -> Snapshots {
        Snapshots {
            validate,
            cfg,
            dir,
            node_id,
            span,
            schedule: None,
        }
    }

    fn reschedule(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.schedule.take() {
            ctx.cancel_future(h);
        }
        if !self.cfg.interval.is_zero() {
            let every = self.cfg.interval;
            self.schedule = Some(ctx.run_interval(every, |act, ctx| {
                let take = act.take();
                ctx.spawn(take.into_actor(act).map(|_, _, _| ()));
            }));
        }
    }

    /// Takes one snapshot, logs it and applies retention.
    fn take(&self) -> impl std::future::Future<Output = Result<Written, String>> + 'static {
        let validate = self.validate.clone();
        let msg = TakeSnapshot {
            dir: self.dir.clone(),
            node_id: self.node_id.clone(),
        };
        let (dir, node_id, keep, max_age) = (
            self.dir.clone(),
            self.node_id.clone(),
            self.cfg.keep,
            self.cfg.max_age,
        );
        async move {
            let result = match validate.send(msg).await {
                Ok(r) => r,
                Err(e) => Err(format!("validate actor unavailable: {e}")),
            };
            match &result {
                Ok(w) => {
                    tracing::info!(
                        file = %w.path.display(),
                        bytes = w.bytes,
                        last_seq = w.manifest.last_seq.unwrap_or(0),
                        "snapshot written"
                    );
                    snapshot::prune_logged(dir, "agent", Some(node_id), keep, max_age).await;
                }
                Err(e) => tracing::error!("snapshot failed: {e}"),
            }
            result
        }
        .instrument(self.span.clone())
    }
}

impl Actor for Snapshots {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let span = self.span.clone();
        let _g = span.enter();
        snapshot::remove_partial(&self.dir);
        self.reschedule(ctx);
    }
}

impl Supervised for Snapshots {}

impl Handler<Ping> for Snapshots {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

/// Take a snapshot now (the admin endpoint's `snapshot`).
#[derive(Message)]
#[rtype(result = "Result<Written, String>")]
pub struct TakeNow;

impl Handler<TakeNow> for Snapshots {
    type Result = ResponseFuture<Result<Written, String>>;
    fn handle(&mut self, _: TakeNow, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.take())
    }
}

/// A reloaded `[snapshot]` table: interval and retention apply live.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure(pub SnapshotConfig);

impl Handler<Reconfigure> for Snapshots {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, ctx: &mut Context<Self>) {
        let retime = msg.0.interval != self.cfg.interval;
        self.cfg.interval = msg.0.interval;
        self.cfg.keep = msg.0.keep;
        self.cfg.max_age = msg.0.max_age;
        if retime {
            self.reschedule(ctx);
        }
    }
}

/// How long a snapshot may take before the admin endpoint gives up waiting.
pub const TAKE_TIMEOUT: Duration = Duration::from_secs(300);
