//! Ingest: polls the node, fetches new headers, and walks back on a parent
//! mismatch until it finds the common ancestor. It judges nothing; it hands
//! what it saw to Validate and waits for it (backpressure).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::Instrument;

use super::breaker::{Breaker, Transition};
use super::judge::{ChainStep, Input};
use super::subscribe::{self, HeadNotice, Subscription};
use super::validate::{Observation, Validate};
use super::Ping;
use crate::chain::{ChainSource, SourceError};
use crate::config::{SourceConfig, ValidateConfig, ValidationLevel};
use crate::model::{Header, HeaderRef};
use crate::store::local::LocalStore;

pub struct Ingest {
    source: Arc<dyn ChainSource>,
    store: LocalStore,
    validate: Addr<Validate>,
    cfg: SourceConfig,
    walk: Walk,
    breaker: Breaker,
    observed: Option<std::sync::Arc<super::metrics::AgentMetrics>>,
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
    /// The chain's expected block time, which bounds how far a head can
    /// plausibly have moved since the stored one.
    pub block_time: Duration,
}

impl Walk {
    pub fn of(v: &ValidateConfig) -> Walk {
        Walk {
            max_reorg_depth: v.max_reorg_depth,
            head_only: v.level == ValidationLevel::Minimal,
            block_time: v.expected_block_time,
        }
    }
}

/// How much faster than its expected block time a chain may be taken to run
/// when judging whether a head can be real.
const FASTEST_BLOCK_RATE: u64 = 10;

/// Why the head a node reports cannot be real, or None when it can be.
/// A head above `MAX_HEIGHT` never can; above the stored head `known`, a
/// head can be at most what the chain could make, at ten times its expected
/// rate, in the time since the stored head's timestamp, plus `slack`
/// blocks (a clock that runs behind, a quick burst). `now_s` is this host's
/// clock.
pub fn implausible_head(
    known: Option<&Header>,
    head: u64,
    now_s: i64,
    block_time: Duration,
    slack: u64,
) -> Option<String> {
    if head > crate::model::MAX_HEIGHT {
        return Some(format!(
            "the node reports head {head}, above {}, a height no chain can have reached; not stored",
            crate::model::MAX_HEIGHT
        ));
    }
    let known = known?;
    let elapsed_s = u64::try_from(now_s.saturating_sub(known.timestamp)).unwrap_or(0);
    let block_ms = (block_time.as_millis() as u64).max(1);
    let possible = elapsed_s
        .saturating_mul(1000 * FASTEST_BLOCK_RATE)
        .checked_div(block_ms)
        .unwrap_or(u64::MAX)
        .saturating_add(slack);
    let jump = head.checked_sub(known.height)?;
    (jump > possible).then(|| {
        format!(
            "the node reports head {head}, {jump} blocks above the stored head {}, but at most {possible} can have been made in the {elapsed_s}s since it ({FASTEST_BLOCK_RATE}x the expected block time of {}ms, plus {slack}); not stored",
            known.height,
            block_time.as_millis()
        )
    })
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
            observed: None,
        }
    }

    /// Records each poll's duration and outcome, and the breaker's state,
    /// for the agent's own metrics.
    pub fn observed(mut self, metrics: std::sync::Arc<super::metrics::AgentMetrics>) -> Ingest {
        self.observed = Some(metrics);
        self
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
        let started = Instant::now();
        let work = async move {
            if let Some(expected) = check_network {
                let actual = source.network_id().await?;
                if actual != expected {
                    return Ok(Polled::WrongNetwork { actual, expected });
                }
            }
            let head = source.head().await?;
            let known = store
                .head()
                .map_err(|e| SourceError::Malformed(e.to_string()))?;
            let slack = max_per_poll.saturating_mul(4);
            let now_s = crate::model::now_unix_ms() / 1000;
            if let Some(why) =
                implausible_head(known.as_ref(), head.height, now_s, walk.block_time, slack)
            {
                validate
                    .send(Observation(Input::Implausible { why }))
                    .await
                    .ok();
                return Ok(Polled::Done { read_status: false });
            }
            // Without hashes there is no chain to walk, only the head.
            let chain = if walk.head_only || !source.has_hashes() {
                poll_head(source.as_ref(), known.as_ref(), head).await?
            } else {
                let (max, depth) = (max_per_poll, walk.max_reorg_depth);
                poll_chain(source.as_ref(), &store, known, head, max, depth).await?
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
                .send(Observation(Input::Polled {
                    chain,
                    status,
                    status_due: want_status,
                }))
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
        Box::pin(work.into_actor(self).map(move |result, act, ctx| {
            let _g = act.span.enter();
            act.polling = false;
            if let Some(m) = &act.observed {
                m.poll(started.elapsed(), result.is_err());
            }
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
                        act.validate.do_send(Observation(Input::Unreachable {
                            error: e.to_string(),
                            cause: e.cause(),
                        }));
                    }
                    (t, d)
                }
            };
            if transition == Transition::Closed {
                tracing::info!("node answers again; circuit breaker closed");
            }
            if let Some(m) = &act.observed {
                m.breaker(act.breaker.state() == super::breaker::State::Open);
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

/// One poll at level `minimal`: the node's head header, when it differs
/// from the stored head `known`.
pub async fn poll_head(
    source: &dyn ChainSource,
    known: Option<&Header>,
    head: HeaderRef,
) -> Result<Option<ChainStep>, SourceError> {
    if known.is_some_and(|k| k.height == head.height && k.hash == head.hash) {
        return Ok(None);
    }
    Ok(Some(ChainStep {
        headers: vec![source.header(head.height).await?],
        linked: true,
    }))
}

/// One poll, given the node's head and the stored head `known`: whatever
/// headers the store lacks or holds differently, at most `max_per_poll`.
pub async fn poll_chain(
    source: &dyn ChainSource,
    store: &LocalStore,
    known: Option<Header>,
    head: HeaderRef,
    max_per_poll: u64,
    max_depth: u64,
) -> Result<Option<ChainStep>, SourceError> {
    let Some(known) = known else {
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
        let upto = head.height.min(known.height.saturating_add(max_per_poll));
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
        let Some(lowest) = headers.first() else {
            return Ok(None);
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::SourceFuture;
    use crate::model::{Hash, HeaderRef, NodeStatus};
    use crate::proto::event::Kind;
    use crate::store::local::Commit;
    use crate::store::Durability;

    /// A node whose chain is one hash per height, with the head it is told.
    struct Told {
        head: u64,
    }

    fn hash(h: u64) -> Hash {
        let mut v = vec![0xab; 24];
        v.extend_from_slice(&h.to_be_bytes());
        Hash(v)
    }

    fn header(h: u64) -> Header {
        Header {
            height: h,
            hash: hash(h),
            parent_hash: hash(h.wrapping_sub(1)),
            timestamp: 1_700_000_000,
            raw: None,
        }
    }

    impl ChainSource for Told {
        fn chain(&self) -> &'static str {
            "ethereum"
        }
        fn head(&self) -> SourceFuture<'_, HeaderRef> {
            let head = self.head;
            Box::pin(async move {
                Ok(HeaderRef {
                    height: head,
                    hash: hash(head),
                })
            })
        }
        fn header(&self, height: u64) -> SourceFuture<'_, Header> {
            Box::pin(async move { Ok(header(height)) })
        }
        fn status(&self) -> SourceFuture<'_, NodeStatus> {
            Box::pin(async { Ok(NodeStatus::default()) })
        }
        fn network_id(&self) -> SourceFuture<'_, String> {
            Box::pin(async { Ok("1".to_string()) })
        }
    }

    fn store_at(dir: &std::path::Path, height: u64) -> LocalStore {
        let s = LocalStore::open(dir, 1 << 20, Durability::ProcessCrash, 1 << 20).unwrap();
        let h = header(height);
        s.commit(
            Commit {
                events: vec![Kind::Header(h.to_proto())],
                headers: vec![h],
                ..Default::default()
            },
            0,
        )
        .unwrap();
        s
    }

    /// A store that already holds a head near u64::MAX (written by an
    /// agent that believed its node) and a node a few blocks above it.
    #[tokio::test]
    async fn a_head_near_the_top_of_u64_does_not_overflow_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_at(dir.path(), u64::MAX - 10);
        let node = Told { head: u64::MAX - 5 };
        let known = store.head().unwrap();
        let head = node.head().await.unwrap();
        let step = poll_chain(&node, &store, known, head, 256, 64)
            .await
            .unwrap()
            .unwrap();
        let heights: Vec<u64> = step.headers.iter().map(|h| h.height).collect();
        assert_eq!(heights, (u64::MAX - 9..=u64::MAX - 5).collect::<Vec<_>>());
        assert!(step.linked);
    }

    #[test]
    fn implausible_heads_are_named_and_plausible_ones_pass() {
        let bt = Duration::from_secs(12);
        let t0 = 1_700_000_000;
        let mut known = header(1_000);
        known.timestamp = t0;
        let check = |known: Option<&Header>, head: u64, now: i64| {
            implausible_head(known, head, now, bt, 1024)
        };
        // No stored head: only the absolute limit applies.
        assert_eq!(check(None, crate::model::MAX_HEIGHT, t0), None);
        let why = check(None, 1 << 60, t0).unwrap();
        assert!(why.contains("no chain can have reached"), "{why}");
        assert!(check(None, u64::MAX, t0).is_some());
        // A minute at 12 s blocks: 5 blocks, 50 at ten times the rate, plus slack.
        assert_eq!(check(Some(&known), 1_000 + 1024 + 50, t0 + 60), None);
        let why = check(Some(&known), 1_000 + 1024 + 51, t0 + 60).unwrap();
        assert!(
            why.contains("1075 blocks above the stored head 1000"),
            "{why}"
        );
        // An agent that was down for a day catches up on a real chain.
        assert_eq!(check(Some(&known), 1_000 + 7_200, t0 + 86_400), None);
        // A stored head from a clock ahead of ours: the slack alone.
        assert_eq!(check(Some(&known), 2_024, t0 - 3_600), None);
        assert!(check(Some(&known), 2_025, t0 - 3_600).is_some());
        // Going down is not this rule's business.
        assert_eq!(check(Some(&known), 5, t0), None);
    }
}
