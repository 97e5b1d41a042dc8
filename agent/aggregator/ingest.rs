//! The aggregator's end of the delivery stream: authenticates the agent by
//! its certificate, persists each batch before acknowledging it, and ignores
//! any seq it already holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{self, AUDIT};
use super::fleet::Fleet;
use super::judge::{Refusal, Sightings};
use super::metrics::Metrics;
use crate::model::{now_unix_ms, MAX_HEIGHT};
use crate::proto::{
    self, agent_message, aggregator_message, event::Kind, ingest_server, Ack, AgentMessage,
    AggregatorMessage, Hello, Welcome,
};
use crate::store::central::{CatchUp, CentralStore};
use crate::store::local::event_last_seq;
use crate::wire::MAX_EVENTS_PER_BATCH;

/// Time from the stream's start to its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
use crate::tls::Identity;

/// Which agents are connected now, and a lock per node so that two streams
/// of one node (an old one and its reconnect) never persist at once.
#[derive(Default)]
pub struct Live {
    inner: Mutex<HashMap<String, NodeLive>>,
}

#[derive(Default)]
struct NodeLive {
    streams: u32,
    last_seen_ms: i64,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// The stream that owns the node id now.
    owner: Option<Owner>,
    /// When the certificate the node last connected with expires (Unix s).
    cert_not_after: Option<i64>,
    /// That certificate's serial, to end the stream if it is revoked.
    cert_serial: Option<Vec<u8>>,
    /// Set when the owner's stream is told to end because its certificate
    /// was revoked (rather than replaced by a newer stream).
    revoked: bool,
    /// The last second agent refused for this node id.
    refused: Option<Refusal>,
}

struct Owner {
    instance: String,
    remote: Option<SocketAddr>,
    /// Told when a newer stream of the same agent replaces this one.
    replaced: Arc<Notify>,
    /// Tells this owner apart from a later one of the same instance.
    stream: u64,
}

impl Sightings for Live {
    fn last_seen_ms(&self, node: &str) -> i64 {
        Live::last_seen_ms(self, node)
    }
    fn last_refusal(&self, node: &str) -> Option<Refusal> {
        Live::last_refusal(self, node)
    }
    fn cert_not_after(&self, node: &str) -> Option<i64> {
        Live::cert_not_after(self, node)
    }
}

/// What `Live::claim` decided about a new stream.
enum Claim {
    /// The stream owns the node id; `replaced` fires if a newer stream of
    /// the same agent takes it over.
    Owner {
        replaced: Arc<Notify>,
        stream: u64,
    },
    Refused(Refusal),
}

impl Live {
    fn with<R>(&self, node: &str, f: impl FnOnce(&mut NodeLive) -> R) -> R {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(node.to_string()).or_default())
    }

    pub fn connected(&self, node: &str) -> bool {
        self.with(node, |n| n.streams > 0)
    }

    pub fn last_seen_ms(&self, node: &str) -> i64 {
        self.with(node, |n| n.last_seen_ms)
    }

    /// When the certificate `node` last connected with expires (Unix s).
    pub fn cert_not_after(&self, node: &str) -> Option<i64> {
        self.with(node, |n| n.cert_not_after)
    }

    /// The last time a second agent was refused for `node`.
    pub fn last_refusal(&self, node: &str) -> Option<Refusal> {
        self.with(node, |n| n.refused.clone())
    }

    /// Ends the streams whose certificate's serial is in `revoked`, between
    /// messages; returns their node ids. A reloaded revocation list then
    /// refuses them at their next handshake.
    pub fn end_revoked(&self, revoked: &std::collections::HashSet<Vec<u8>>) -> Vec<String> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = Vec::new();
        for (node, n) in map.iter_mut() {
            let hit = n.cert_serial.as_ref().is_some_and(|s| revoked.contains(s));
            if let (true, Some(owner)) = (hit, &n.owner) {
                n.revoked = true;
                owner.replaced.notify_one();
                ended.push(node.clone());
            }
        }
        ended
    }

    fn touch(&self, node: &str) {
        self.with(node, |n| n.last_seen_ms = now_unix_ms());
    }

    /// One live stream per node id. A stream of the instance that owns the
    /// node replaces the older one at once (the old one was left half-open
    /// by a network blip); so does any stream when the owner has sent
    /// nothing for `presumed_dead_ms` (its host went away without closing
    /// it). Any other instance is a second agent with the same certificate
    /// and is refused.
    fn claim(
        &self,
        node: &str,
        instance: &str,
        remote: Option<SocketAddr>,
        presumed_dead_ms: i64,
        now_ms: i64,
    ) -> Claim {
        static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        self.with(node, |n| {
            if let Some(owner) = &n.owner {
                let quiet = now_ms - n.last_seen_ms > presumed_dead_ms;
                if owner.instance != instance && !quiet {
                    let r = Refusal {
                        at_ms: now_ms,
                        instance: instance.to_string(),
                        remote,
                        owner_instance: owner.instance.clone(),
                        owner_remote: owner.remote,
                    };
                    n.refused = Some(r.clone());
                    return Claim::Refused(r);
                }
                owner.replaced.notify_one();
            }
            let replaced = Arc::new(Notify::new());
            let stream = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            n.owner = Some(Owner {
                instance: instance.to_string(),
                remote,
                replaced: replaced.clone(),
                stream,
            });
            Claim::Owner { replaced, stream }
        })
    }

    /// The stream ended: it no longer owns the node, unless it was replaced.
    fn release(&self, node: &str, stream: u64) {
        self.with(node, |n| {
            if n.owner.as_ref().is_some_and(|o| o.stream == stream) {
                n.owner = None;
            }
        })
    }
}

pub struct IngestService {
    /// Below this many free bytes on the store's filesystem no batch is
    /// taken in.
    min_free: u64,
    store: CentralStore,
    live: Arc<Live>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
}

impl IngestService {
    /// Takes in no batch while the store's filesystem has fewer than
    /// `bytes` free.
    pub fn min_free(mut self, bytes: u64) -> Self {
        self.min_free = bytes;
        self
    }

    pub fn new(
        store: CentralStore,
        live: Arc<Live>,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
    ) -> Self {
        IngestService {
            min_free: 0,
            store,
            live,
            fleet,
            metrics,
        }
    }
}

/// What a stream's tasks share.
struct StreamCtx {
    min_free: u64,
    node: String,
    network: String,
    chain: String,
    store: CentralStore,
    live: Arc<Live>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!("ingest: {e}");
    Status::internal(format!("aggregator store error: {e}"))
}

#[tonic::async_trait]
impl ingest_server::Ingest for IngestService {
    type ReportStream = ReceiverStream<Result<AggregatorMessage, Status>>;

    async fn report(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let remote = req.remote_addr();
        let node = match auth::identity(&req)? {
            Identity::Agent(node) => node,
            Identity::Operator(name) => {
                tracing::warn!(target: AUDIT, operator = %name, "refused: operator certificate on the ingest stream");
                return Err(Status::permission_denied(
                    "operator certificates may not report events; use an agent certificate",
                ));
            }
        };
        let (req_not_after, req_serial) = req
            .peer_certs()
            .and_then(|c| c.first().and_then(|d| crate::tls::expiry_and_serial(d)))
            .unzip();
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                body: Some(agent_message::Body::Hello(h)),
            }))) => h,
            Ok(Err(s)) => return Err(s),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no Hello within {} s",
                    HELLO_TIMEOUT.as_secs()
                )))
            }
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.node_id != node {
            tracing::warn!(
                target: AUDIT,
                node_id = %node,
                claimed = %hello.node_id,
                remote = ?remote,
                "refused: stream claims another node id than its certificate"
            );
            return Err(Status::permission_denied(format!(
                "certificate is for node {node:?}, but the stream claims {:?}",
                hello.node_id
            )));
        }
        if let Err(why) = self.fleet.admit(&hello.network, &hello.chain) {
            tracing::warn!(
                target: AUDIT,
                node_id = %node,
                network = %hello.network,
                remote = ?remote,
                "refused: {why}"
            );
            self.metrics.refused("network");
            return Err(Status::permission_denied(why));
        }
        let presumed_dead_ms = self.fleet.silent_after().as_millis() as i64;
        let (replaced, stream) = match self.live.claim(
            &node,
            &hello.instance_id,
            remote,
            presumed_dead_ms,
            now_unix_ms(),
        ) {
            Claim::Owner { replaced, stream } => (replaced, stream),
            Claim::Refused(r) => {
                tracing::warn!(
                    target: AUDIT,
                    node_id = %node,
                    remote = ?r.remote,
                    instance = %r.instance,
                    streaming_remote = ?r.owner_remote,
                    streaming_instance = %r.owner_instance,
                    "refused: a second agent with this node id while one is streaming"
                );
                self.metrics.refused("duplicate-agent");
                return Err(Status::already_exists(format!(
                        "another agent (instance {}, from {}) is streaming as node {node:?}; two agents must not share one certificate",
                        r.owner_instance,
                        r.owner_remote.map_or("-".into(), |a| a.to_string())
                    )));
            }
        };
        let lock = self.live.with(&node, |n| {
            n.cert_not_after = req_not_after.or(n.cert_not_after);
            n.cert_serial = req_serial.or(n.cert_serial.take());
            n.revoked = false;
            n.streams += 1;
            n.last_seen_ms = now_unix_ms();
            n.lock.clone()
        });
        self.metrics.connected(1);
        // Silence is judged from here, before the first batch.
        self.fleet.know(&node, &hello.network, &hello.chain);
        let ctx = StreamCtx {
            min_free: self.min_free,
            node,
            network: hello.network.clone(),
            chain: hello.chain.clone(),
            store: self.store.clone(),
            live: self.live.clone(),
            fleet: self.fleet.clone(),
            metrics: self.metrics.clone(),
            lock,
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let end = welcome(&ctx, &hello, &tx).await;
            let end = match end {
                Ok(catch_up) => serve_stream(&ctx, &mut inbound, &tx, &replaced, catch_up).await,
                Err(e) => Err(e),
            };
            ctx.live.release(&ctx.node, stream);
            ctx.live
                .with(&ctx.node, |n| n.streams = n.streams.saturating_sub(1));
            ctx.metrics.connected(-1);
            match end {
                Ok(()) => tracing::info!(node_id = %ctx.node, "agent disconnected"),
                Err(s) => {
                    tracing::warn!(node_id = %ctx.node, "agent stream ended: {}", s.message());
                    let _ = tx.send(Err(s)).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Records the agent and sends the Welcome, under the node's lock: an older
/// stream of the node finishes its persist first, so the resume point is
/// what the store holds. Returns the stream's catch-up when the agent holds
/// less than the store.
async fn welcome(
    ctx: &StreamCtx,
    hello: &Hello,
    tx: &mpsc::Sender<Result<AggregatorMessage, Status>>,
) -> Result<Option<CatchUp>, Status> {
    let rec = {
        let _g = ctx.lock.lock().await;
        let before = ctx.store.node(&ctx.node).map_err(internal)?;
        if let Some(old) = before.filter(|r| !r.network.is_empty() && r.network != hello.network) {
            tracing::warn!(
                target: AUDIT,
                node_id = %ctx.node,
                from = %old.network,
                to = %hello.network,
                "node changed network"
            );
        }
        ctx.store
            .register(&ctx.node, hello, now_unix_ms())
            .map_err(internal)?
    };
    tracing::info!(
        node_id = %ctx.node,
        network = %hello.network,
        chain = %hello.chain,
        agent_version = %hello.agent_version,
        instance = %hello.instance_id,
        agent_last_seq = hello.local_last_seq,
        stored_last_seq = rec.last_seq,
        "agent connected"
    );
    let catch_up = CatchUp::after_hello(&rec, hello.local_last_seq);
    let welcome = AggregatorMessage {
        body: Some(aggregator_message::Body::Welcome(Welcome {
            last_stored_seq: rec.last_seq,
        })),
    };
    tx.send(Ok(welcome)).await.map_err(internal)?;
    Ok(catch_up)
}

/// Why a batch cannot be taken in, before any of it is stored: more events
/// than a message may carry, seqs out of order, or a height above what any
/// chain has.
pub fn check_batch(batch: &proto::Batch) -> Result<(), String> {
    if batch.events.len() > MAX_EVENTS_PER_BATCH {
        return Err(format!(
            "a batch may carry at most {MAX_EVENTS_PER_BATCH} events; this one has {}",
            batch.events.len()
        ));
    }
    let mut after = None;
    for e in &batch.events {
        if after.is_some_and(|a| e.seq <= a) {
            return Err(format!(
                "seq {} does not follow seq {}",
                e.seq,
                after.unwrap_or(0)
            ));
        }
        if let Some(Kind::Resent(_)) = &e.kind {
            return Err(format!(
                "event {} is a resent marker, which only the aggregator writes",
                e.seq
            ));
        }
        if let Some(Kind::Gap(g)) = &e.kind {
            if g.last_seq < e.seq {
                return Err(format!(
                    "gap at seq {} ends before it starts ({})",
                    e.seq, g.last_seq
                ));
            }
        }
        after = Some(event_last_seq(e));
        let height = match &e.kind {
            Some(Kind::Header(h)) => h.height,
            Some(Kind::Status(s)) => s.head_height,
            _ => 0,
        };
        if height > MAX_HEIGHT {
            return Err(format!(
                "event {} is at height {height}, above {MAX_HEIGHT}, which no chain has reached",
                e.seq
            ));
        }
    }
    Ok(())
}

async fn serve_stream(
    ctx: &StreamCtx,
    inbound: &mut Streaming<AgentMessage>,
    tx: &mpsc::Sender<Result<AggregatorMessage, Status>>,
    replaced: &Notify,
    mut catch_up: Option<CatchUp>,
) -> Result<(), Status> {
    let (node, store, live, lock) = (ctx.node.as_str(), &ctx.store, &ctx.live, &ctx.lock);
    // Persisting the next batch overlaps with flushing the previous ones:
    // the reader persists, the acker waits for durability and acknowledges
    // everything that one flush covered with one Ack.
    let (persisted_tx, mut persisted_rx) = mpsc::channel::<u64>(64);
    let reader = async move {
        loop {
            // A newer stream of the same agent ends this one between
            // messages, never during a persist.
            let msg = tokio::select! {
                msg = inbound.message() => msg,
                _ = replaced.notified() => {
                    if live.with(node, |n| std::mem::take(&mut n.revoked)) {
                        tracing::warn!(target: AUDIT, node_id = %node, "stream ended: its certificate is revoked");
                        return Err(Status::permission_denied("this agent's certificate is revoked"));
                    }
                    tracing::info!(node_id = %node, "stream replaced by a newer one of the same agent");
                    return Err(Status::already_exists("replaced by a newer stream of this agent"));
                }
            };
            let msg = match msg {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(()),
                Err(s) => {
                    if s.code() == tonic::Code::InvalidArgument {
                        tracing::warn!(target: AUDIT, node_id = %node, "refused a message: {}", s.message());
                        ctx.metrics.refused("message-limit");
                    }
                    return Err(s);
                }
            };
            live.touch(node);
            match msg.body {
                Some(agent_message::Body::Batch(batch)) => {
                    // A full disk would leave sled unwritable until a
                    // restart: refuse before, and the agent keeps the batch.
                    if let Some(free) = store.free_bytes().filter(|f| *f < ctx.min_free) {
                        tracing::warn!(target: AUDIT, node_id = %node, free_bytes = free, "refused a batch: the store's disk is nearly full");
                        ctx.metrics.refused("disk");
                        return Err(Status::unavailable(format!(
                            "the aggregator's disk has {free} bytes free, under its store.min_free_bytes ({}); the batch stays with the agent",
                            ctx.min_free
                        )));
                    }
                    if let Err(why) = check_batch(&batch) {
                        tracing::warn!(target: AUDIT, node_id = %node, "refused a batch: {why}");
                        ctx.metrics.refused("bad-batch");
                        return Err(Status::invalid_argument(format!("batch refused: {why}")));
                    }
                    let pending = batch.pending;
                    let persisted = {
                        let _g = lock.lock().await;
                        let _s = store.persisting().await;
                        store
                            .persist(node, batch.events, now_unix_ms(), &mut catch_up)
                            .await
                            .map_err(internal)?
                    };
                    ctx.metrics
                        .counted(node, &ctx.network, persisted.stored, persisted.duplicates);
                    for &(first, last) in &persisted.missing {
                        ctx.metrics.missing(&ctx.network, node, last - first + 1);
                        ctx.fleet.seq_gap(node, &ctx.network, first, last);
                    }
                    ctx.fleet
                        .on_batch(node, &ctx.network, &ctx.chain, &persisted.events, pending);
                    if persisted_tx.send(persisted.last_seq).await.is_err() {
                        return Ok(());
                    }
                }
                Some(agent_message::Body::Heartbeat(_)) => {}
                Some(agent_message::Body::Hello(_)) | None => {
                    return Err(Status::invalid_argument(
                        "Hello may only be the first message",
                    ))
                }
            }
        }
    };
    let acker = async {
        while let Some(mut upto) = persisted_rx.recv().await {
            // Everything queued now is persisted; one flush covers it all.
            while let Ok(more) = persisted_rx.try_recv() {
                upto = upto.max(more);
            }
            store.durable().await.map_err(internal)?;
            let ack = AggregatorMessage {
                body: Some(aggregator_message::Body::Ack(Ack { upto_seq: upto })),
            };
            if tx.send(Ok(ack)).await.is_err() {
                break;
            }
        }
        Ok::<(), Status>(())
    };
    let (read, acked) = tokio::join!(reader, acker);
    read.and(acked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Batch, Event, Header};

    fn header(seq: u64, height: u64) -> Event {
        Event {
            seq,
            kind: Some(Kind::Header(Header {
                height,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn batches_out_of_order_too_large_or_too_high_are_refused() {
        let ok = Batch {
            events: vec![header(1, 1), header(2, 2)],
            ..Default::default()
        };
        assert_eq!(check_batch(&ok), Ok(()));
        let back = Batch {
            events: vec![header(2, 1), header(2, 2)],
            ..Default::default()
        };
        assert!(check_batch(&back).unwrap_err().contains("does not follow"));
        let high = Batch {
            events: vec![header(1, MAX_HEIGHT + 1)],
            ..Default::default()
        };
        assert!(check_batch(&high)
            .unwrap_err()
            .contains("no chain has reached"));
        let many = Batch {
            events: (1..=MAX_EVENTS_PER_BATCH as u64 + 1)
                .map(|i| header(i, i))
                .collect(),
            ..Default::default()
        };
        assert!(check_batch(&many)
            .unwrap_err()
            .contains("at most 10000 events"));

        let resent = Batch {
            events: vec![Event {
                seq: 1,
                kind: Some(Kind::Resent(crate::proto::Resent::default())),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(check_batch(&resent)
            .unwrap_err()
            .contains("only the aggregator writes"));
    }

    #[test]
    fn one_stream_per_node_id_and_a_reconnect_replaces_its_own() {
        let live = Live::default();
        let claim = |instance: &str, now| live.claim("n1", instance, None, 60_000, now);
        let Claim::Owner { replaced, stream } = claim("a", 0) else {
            panic!("the first stream owns the node");
        };
        live.touch("n1");
        let now = now_unix_ms();
        // Another process with the same certificate is refused...
        let Claim::Refused(r) = claim("b", now) else {
            panic!("a second instance is refused");
        };
        assert_eq!((r.instance.as_str(), r.owner_instance.as_str()), ("b", "a"));
        assert_eq!(live.last_refusal("n1"), Some(r));
        // ...while a reconnect of the owner replaces its old stream at once.
        let Claim::Owner { stream: again, .. } = claim("a", now) else {
            panic!("the same instance reconnects");
        };
        assert!(
            futures_util::FutureExt::now_or_never(replaced.notified()).is_some(),
            "the old stream is told"
        );
        // The replaced stream's end does not release the new owner.
        live.release("n1", stream);
        assert!(matches!(claim("b", now), Claim::Refused(_)));
        // An owner silent past the limit is presumed dead: its host went away.
        assert!(matches!(claim("b", now + 60_001), Claim::Owner { .. }));
        live.release("n1", again);
    }
}
