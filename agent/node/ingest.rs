//! Ingest: polls the node, fetches new headers, and walks back on a parent
//! mismatch until it finds the common ancestor. It judges nothing; it hands
//! what it saw to Validate and waits for it (backpressure).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Instrument;

use super::breaker::{Breaker, Transition};
use super::subscribe::{self, HeadNotice, Subscription};
use super::validate::{Observation, Validate};
use super::Ping;
use crate::chain::{ChainSource, SourceError};
use crate::config::{SourceConfig, ValidateConfig, ValidationLevel};
use crate::model::Header;
use crate::store::local::LocalStore;

pub struct Ingest {
    source: Arc<dyn ChainSource>,
    store: LocalStore,
    validate: Addr<Validate>,
    cfg: SourceConfig,
    walk: Walk,
    breaker: Breaker,
    last_status: Option<Instant>,
    span: tracing::Span,
    stopping: bool,
    /// Set once the node has shown it is on the configured network.
    network_checked: bool,
    /// A poll is under way or queued.
    polling: bool,
    /// A head notice came during the poll: poll again at once.
    woken: bool,
    next_tick: Option<SpawnHandle>,
    fatal: tokio::sync::watch::Sender<Option<String>>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Tick;

/// What validation needs from a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// How far back a reorg is followed.
    pub max_reorg_depth: u64,
    /// Level `minimal`: fetch the head alone; no walk, no status.
    pub head_only: bool,
}

impl Walk {
    pub fn of(v: &ValidateConfig) -> Walk {
        Walk {
            max_reorg_depth: v.max_reorg_depth,
            head_only: v.level == ValidationLevel::Minimal,
        }
    }
}

/// Stop polling (graceful shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopPolling;

impl Ingest {
    pub fn new(
        source: Arc<dyn ChainSource>,
        store: LocalStore,
        validate: Addr<Validate>,
        cfg: SourceConfig,
        walk: Walk,
        span: tracing::Span,
        fatal: tokio::sync::watch::Sender<Option<String>>,
    ) -> Ingest {
        let breaker = Breaker::new(cfg.breaker_failures, cfg.poll_interval, cfg.backoff_max);
        Ingest {
            source,
            store,
            validate,
            walk,
            breaker,
            last_status: None,
            network_checked: cfg.network_id.is_none(),
            cfg,
            span,
            stopping: false,
            polling: false,
            woken: false,
            next_tick: None,
            fatal,
        }
    }
}

impl Actor for Ingest {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let _g = self.span.enter();
        tracing::info!(
            url = %self.cfg.url,
            every_ms = self.cfg.poll_interval.as_millis() as u64,
            "polling the node"
        );
        if let (Some(url), Some(request)) =
            (self.cfg.ws_url.clone(), self.source.head_subscription())
        {
            let sub = Subscription {
                url,
                request,
                source: self.source.clone(),
                max_bytes: self.cfg.max_reply_bytes,
                timeout: self.cfg.timeout,
                backoff_max: self.cfg.backoff_max,
            };
            let follow = subscribe::follow(sub, ctx.address().recipient());
            ctx.spawn(follow.instrument(self.span.clone()).into_actor(self));
        }
        ctx.notify(Tick);
    }
}

impl Handler<HeadNotice> for Ingest {
    type Result = ();
    /// Polls now instead of at the next tick; during a poll, right after it.
    fn handle(&mut self, _: HeadNotice, ctx: &mut Context<Self>) {
        if self.polling {
            self.woken = true;
        } else if !self.stopping {
            if let Some(tick) = self.next_tick.take() {
                ctx.cancel_future(tick);
            }
            // Counts as polling from here: notices that arrive before the
            // Tick is handled must not queue more polls.
            self.polling = true;
            ctx.notify(Tick);
        }
    }
}

impl Supervised for Ingest {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        let _g = self.span.enter();
        tracing::warn!("ingest restarting");
    }
}

impl Handler<Ping> for Ingest {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

/// The live part of a reloaded config: poll and status intervals, the
/// breaker, the per-poll header limit, the reorg depth and whether to fetch
/// the head alone. The URL, timeout
/// and reply cap belong to the RPC client, made once at start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure {
    pub source: SourceConfig,
    pub walk: Walk,
}

impl Handler<Reconfigure> for Ingest {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, _: &mut Context<Self>) {
        let new = msg.source;
        self.cfg.poll_interval = new.poll_interval;
        self.cfg.status_interval = new.status_interval;
        self.cfg.breaker_failures = new.breaker_failures;
        self.cfg.backoff_max = new.backoff_max;
        self.cfg.max_headers_per_poll = new.max_headers_per_poll;
        self.walk = msg.walk;
        self.breaker
            .retune(new.breaker_failures, new.poll_interval, new.backoff_max);
    }
}

impl Handler<StopPolling> for Ingest {
    type Result = ();
    fn handle(&mut self, _: StopPolling, _: &mut Context<Self>) {
        self.stopping = true;
    }
}

impl Handler<Tick> for Ingest {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Tick, _: &mut Context<Self>) -> Self::Result {
        if self.stopping {
            return Box::pin(actix::fut::ready(()));
        }
        self.polling = true;
        self.next_tick = None;
        let source = self.source.clone();
        let store = self.store.clone();
        let validate = self.validate.clone();
        let max_per_poll = self.cfg.max_headers_per_poll;
        let walk = self.walk;
        let check_network = (!self.network_checked)
            .then(|| self.cfg.network_id.clone())
            .flatten();
        let want_status = self
            .last_status
            .is_none_or(|t| t.elapsed() >= self.cfg.status_interval);
        let work = async move {
            if let Some(expected) = check_network {
                let actual = source.network_id().await?;
                if actual != expected {
                    return Ok(Polled::WrongNetwork { actual, expected });
                }
            }
            // Without hashes there is no chain to walk, only the head.
            let chain = if walk.head_only || !source.has_hashes() {
                poll_head(source.as_ref(), &store).await?
            } else {
                poll_chain(source.as_ref(), &store, max_per_poll, walk.max_reorg_depth).await?
            };
            let status = if want_status && walk.head_only {
                // Level minimal reads no peers or sync state; the empty
                // status still carries head, reachability and latency.
                Some(crate::model::NodeStatus::default())
            } else if want_status {
                match source.status().await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!("status read failed: {e}");
                        None
                    }
                }
            } else {
                None
            };
            // Validate answers once the observation is committed and durable.
            if validate
                .send(Observation::Polled {
                    chain,
                    status,
                    status_due: want_status,
                })
                .await
                .is_err()
            {
                tracing::error!("validate actor is gone; observation not delivered");
            }
            Ok::<Polled, SourceError>(Polled::Done {
                read_status: want_status,
            })
        }
        .instrument(self.span.clone());
        Box::pin(work.into_actor(self).map(|result, act, ctx| {
            let _g = act.span.enter();
            act.polling = false;
            let (transition, delay) = match result {
                Ok(Polled::WrongNetwork { actual, expected }) => {
                    let msg = format!(
                        "source.network_id: the node at {} is on network {actual}, but the config expects {expected}; refusing to monitor it",
                        act.cfg.url
                    );
                    tracing::error!("{msg}");
                    act.fatal.send_replace(Some(msg));
                    return;
                }
                Ok(Polled::Done { read_status }) => {
                    act.network_checked = true;
                    if read_status {
                        act.last_status = Some(Instant::now());
                    }
                    act.breaker.success()
                }
                Err(e) => {
                    let (t, d) = act.breaker.failure();
                    tracing::warn!(
                        failures = act.breaker.consecutive_failures(),
                        retry_in_ms = d.as_millis() as u64,
                        "poll failed: {e}"
                    );
                    if t == Transition::Opened {
                        act.validate.do_send(Observation::Unreachable {
                            error: e.to_string(),
                        });
                    }
                    (t, d)
                }
            };
            if transition == Transition::Closed {
                tracing::info!("node answers again; circuit breaker closed");
            }
            let delay = if std::mem::take(&mut act.woken) && transition != Transition::Opened {
                Duration::ZERO
            } else {
                delay.max(Duration::from_millis(10))
            };
            act.next_tick = Some(ctx.notify_later(Tick, delay));
        }))
    }
}

/// How a poll ended.
enum Polled {
    Done { read_status: bool },
    WrongNetwork { actual: String, expected: String },
}

/// New canonical headers since the store's head, ascending and linked to
/// each other. `linked` is false when the walk-back hit `max_depth` without
/// reaching a header the store agrees with.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainStep {
    pub headers: Vec<Header>,
    pub linked: bool,
}

/// One poll at level `minimal`: the node's head header, when it changed.
pub async fn poll_head(
    source: &dyn ChainSource,
    store: &LocalStore,
) -> Result<Option<ChainStep>, SourceError> {
    let head = source.head().await?;
    let known = store
        .head()
        .map_err(|e| SourceError::Malformed(e.to_string()))?;
    if known.is_some_and(|k| k.height == head.height && k.hash == head.hash) {
        return Ok(None);
    }
    Ok(Some(ChainStep {
        headers: vec![source.header(head.height).await?],
        linked: true,
    }))
}

/// One poll: the node's head, then whatever headers the store lacks or
/// holds differently.
pub async fn poll_chain(
    source: &dyn ChainSource,
    store: &LocalStore,
    max_per_poll: u64,
    max_depth: u64,
) -> Result<Option<ChainStep>, SourceError> {
    let head = source.head().await?;
    let Some(known) = store
        .head()
        .map_err(|e| SourceError::Malformed(e.to_string()))?
    else {
        // A new store starts at the node's current head; history before it
        // is the node's business, not ours.
        let h = source.header(head.height).await?;
        return Ok(Some(ChainStep {
            headers: vec![h],
            linked: true,
        }));
    };
    if head.height == known.height && head.hash == known.hash {
        return Ok(None);
    }
    let mut headers = Vec::new();
    if head.height > known.height {
        let upto = head.height.min(known.height + max_per_poll);
        for h in known.height + 1..=upto {
            let header = source.header(h).await?;
            if let Some(prev) = headers.last() {
                if !links(prev, &header) {
                    // The node reorganised while we fetched; take what links.
                    break;
                }
            }
            headers.push(header);
        }
    } else {
        headers.push(source.header(head.height).await?);
    }
    // Walk back while the lowest header does not link to what the store holds.
    let mut depth = 0;
    loop {
        let lowest = &headers[0];
        if lowest.height == 0 {
            return Ok(Some(ChainStep {
                headers,
                linked: true,
            }));
        }
        let below = lowest.height - 1;
        let stored = store
            .header(below)
            .map_err(|e| SourceError::Malformed(e.to_string()))?;
        match stored {
            None => {
                return Ok(Some(ChainStep {
                    headers,
                    linked: true,
                }))
            }
            Some(s) if s.hash == lowest.parent_hash => {
                return Ok(Some(ChainStep {
                    headers,
                    linked: true,
                }))
            }
            Some(_) => {}
        }
        depth += 1;
        if depth > max_depth {
            return Ok(Some(ChainStep {
                headers,
                linked: false,
            }));
        }
        let parent = source.header(below).await?;
        if !links(&parent, &headers[0]) {
            // The node changed under us mid-walk; try again next poll.
            return Err(SourceError::Malformed(format!(
                "header {below} does not link to header {} (node reorganised during the poll)",
                below + 1
            )));
        }
        headers.insert(0, parent);
    }
}

fn links(parent: &Header, child: &Header) -> bool {
    child.height == parent.height + 1 && child.parent_hash == parent.hash
}
