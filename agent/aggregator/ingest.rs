//! The aggregator's end of the delivery stream: authenticates the agent by
//! its certificate, persists each batch before acknowledging it, and ignores
//! any seq it already holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{self, AUDIT};
use super::fleet::Fleet;
use super::metrics::Metrics;
use crate::model::now_unix_ms;
use crate::proto::{
    agent_message, aggregator_message, ingest_server, Ack, AgentMessage, AggregatorMessage, Welcome,
};
use crate::store::central::CentralStore;
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

    fn touch(&self, node: &str) {
        self.with(node, |n| n.last_seen_ms = now_unix_ms());
    }
}

pub struct IngestService {
    store: CentralStore,
    live: Arc<Live>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
}

impl IngestService {
    pub fn new(
        store: CentralStore,
        live: Arc<Live>,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
    ) -> Self {
        IngestService {
            store,
            live,
            fleet,
            metrics,
        }
    }
}

/// What a stream's tasks share.
struct StreamCtx {
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
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(15), inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                body: Some(agent_message::Body::Hello(h)),
            }))) => h,
            Ok(Err(s)) => return Err(s),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 15 s")),
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
        let rec = self
            .store
            .register(&node, &hello, now_unix_ms())
            .map_err(internal)?;
        tracing::info!(
            node_id = %node,
            network = %hello.network,
            chain = %hello.chain,
            agent_version = %hello.agent_version,
            agent_last_seq = hello.local_last_seq,
            stored_last_seq = rec.last_seq,
            "agent connected"
        );
        let (tx, rx) = mpsc::channel(16);
        let welcome = AggregatorMessage {
            body: Some(aggregator_message::Body::Welcome(Welcome {
                last_stored_seq: rec.last_seq,
            })),
        };
        tx.send(Ok(welcome)).await.map_err(internal)?;
        let lock = self.live.with(&node, |n| {
            n.streams += 1;
            n.last_seen_ms = now_unix_ms();
            n.lock.clone()
        });
        self.metrics.connected(1);
        let ctx = StreamCtx {
            node,
            network: hello.network.clone(),
            chain: hello.chain.clone(),
            store: self.store.clone(),
            live: self.live.clone(),
            fleet: self.fleet.clone(),
            metrics: self.metrics.clone(),
            lock,
        };
        tokio::spawn(async move {
            let end = serve_stream(&ctx, &mut inbound, &tx).await;
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

async fn serve_stream(
    ctx: &StreamCtx,
    inbound: &mut Streaming<AgentMessage>,
    tx: &mpsc::Sender<Result<AggregatorMessage, Status>>,
) -> Result<(), Status> {
    let (node, store, live, lock) = (ctx.node.as_str(), &ctx.store, &ctx.live, &ctx.lock);
    // Persisting the next batch overlaps with flushing the previous ones:
    // the reader persists, the acker waits for durability and acknowledges
    // everything that one flush covered with one Ack.
    let (persisted_tx, mut persisted_rx) = mpsc::channel::<u64>(64);
    let reader = async move {
        while let Some(msg) = inbound.message().await? {
            live.touch(node);
            match msg.body {
                Some(agent_message::Body::Batch(batch)) => {
                    let persisted = {
                        let _g = lock.lock().await;
                        let _s = store.persisting().await;
                        store
                            .persist(node, batch.events, now_unix_ms())
                            .await
                            .map_err(internal)?
                    };
                    ctx.metrics
                        .counted(node, &ctx.network, persisted.stored, persisted.duplicates);
                    ctx.fleet
                        .on_batch(node, &ctx.network, &ctx.chain, &persisted.events);
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
        Ok::<(), Status>(())
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
