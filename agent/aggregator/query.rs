//! The operator query API. Callers are checked by the `operator_only`
//! interceptor; each call is written to the audit log.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use tonic::{Request, Response, Status};

use super::auth::{self, AUDIT};
use super::fleet::Fleet;
use super::ingest::Live;
use super::metrics::Metrics;
use super::ratelimit::QueryLimits;
use crate::proto::{
    query_server, EventsRequest, EventsResponse, Finding, FindingState, FleetRequest,
    FleetResponse, GetNodeRequest, HeadersRequest, HeadersResponse, ListFindingsRequest,
    ListFindingsResponse, ListNodesRequest, ListNodesResponse, NodeDetail, NodeFinding, NodeRecord,
    NodeSummary, WatchRequest,
};
use crate::store::central::CentralStore;

const MAX_HEADERS: u64 = 10_000;
const MAX_EVENTS: u32 = 10_000;

pub struct QueryService {
    store: CentralStore,
    live: Arc<Live>,
    fleet: Arc<Fleet>,
    limits: Option<(Arc<QueryLimits>, Arc<Metrics>)>,
}

impl QueryService {
    pub fn new(store: CentralStore, live: Arc<Live>, fleet: Arc<Fleet>) -> Self {
        QueryService {
            store,
            live,
            fleet,
            limits: None,
        }
    }

    /// Limits each operator's calls (`limits.query_per_second`), counting
    /// refusals in `metrics`.
    pub fn limited(mut self, limits: Arc<QueryLimits>, metrics: Arc<Metrics>) -> Self {
        self.limits = Some((limits, metrics));
        self
    }

    /// Admits a call within its operator's rate limit and writes it to the
    /// audit log; a refused one gets ResourceExhausted.
    fn admit<T>(&self, req: &Request<T>, method: &str) -> Result<(), Status> {
        let Ok(id) = auth::identity(req) else {
            return Ok(());
        };
        if let (Some((limits, metrics)), crate::tls::Identity::Operator(name)) = (&self.limits, &id)
        {
            if let Err(refused) = limits.admit(name, method) {
                metrics.query_refused(name);
                return Err(refused);
            }
        }
        tracing::info!(target: AUDIT, caller = %id, method, "query");
        Ok(())
    }

    fn summary(&self, rec: &NodeRecord, open: &[Finding]) -> NodeSummary {
        let connected = self.live.connected(&rec.node_id);
        let status = if connected {
            super::judge::own_status(|k| open.iter().any(|f| f.kind() == k))
        } else {
            "disconnected"
        };
        NodeSummary {
            node_id: rec.node_id.clone(),
            network: rec.network.clone(),
            chain: rec.chain.clone(),
            head: rec.head.clone(),
            last_seen_unix_ms: rec
                .last_seen_unix_ms
                .max(self.live.last_seen_ms(&rec.node_id)),
            status: status.into(),
            connected,
            last_seq: rec.last_seq,
        }
    }

    /// The fleet keeps every open finding in memory; the store's copy also
    /// holds every resolved one, which a listing need not scan.
    fn open_findings(&self, node: &str) -> Result<Vec<Finding>, Status> {
        Ok(self.fleet.open_findings(node))
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("aggregator store error: {e}"))
}

#[tonic::async_trait]
impl query_server::Query for QueryService {
    async fn list_nodes(
        &self,
        req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.admit(&req, "ListNodes")?;
        let mut nodes = Vec::new();
        for rec in self.store.nodes().map_err(internal)? {
            let open = self.open_findings(&rec.node_id)?;
            nodes.push(self.summary(&rec, &open));
        }
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(&self, req: Request<GetNodeRequest>) -> Result<Response<NodeDetail>, Status> {
        self.admit(&req, "GetNode")?;
        let id = &req.get_ref().node_id;
        let rec = self
            .store
            .node(id)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no node {id:?} has reported")))?;
        let open = self.open_findings(id)?;
        Ok(Response::new(NodeDetail {
            summary: Some(self.summary(&rec, &open)),
            status: rec.status.clone(),
            open_findings: open,
            agent_version: rec.agent_version.clone(),
            duplicates_ignored: rec.duplicates_ignored,
            dropped_events: rec.dropped_events,
            last_snapshot: rec.last_snapshot.clone(),
            last_snapshot_at_unix_ms: rec.last_snapshot_at_unix_ms,
            missing_events: rec.missing_events,
            redelivered_headers: rec.redelivered_headers,
        }))
    }

    async fn list_findings(
        &self,
        req: Request<ListFindingsRequest>,
    ) -> Result<Response<ListFindingsResponse>, Status> {
        self.admit(&req, "ListFindings")?;
        let q = req.into_inner();
        let nodes: Vec<String> = if q.node_id.is_empty() {
            let mut scopes: Vec<String> = self
                .store
                .nodes()
                .map_err(internal)?
                .into_iter()
                .map(|r| r.node_id)
                .collect();
            // Network-wide findings live under `@network`.
            scopes.extend(self.fleet.network_scopes());
            scopes
        } else {
            vec![q.node_id.clone()]
        };
        let mut findings = Vec::new();
        for node in nodes {
            for f in self.store.findings(&node).map_err(internal)? {
                if q.kind.is_some_and(|k| k != f.kind) {
                    continue;
                }
                if q.open_only && f.state() != FindingState::Open {
                    continue;
                }
                if f.opened_at_unix_ms.max(f.resolved_at_unix_ms) < q.since_unix_ms {
                    continue;
                }
                findings.push(super::judge::node_finding(&node, f));
            }
        }
        findings.sort_by_key(|f| f.finding.as_ref().map_or(0, |f| f.opened_at_unix_ms));
        Ok(Response::new(ListFindingsResponse { findings }))
    }

    async fn headers(
        &self,
        req: Request<HeadersRequest>,
    ) -> Result<Response<HeadersResponse>, Status> {
        self.admit(&req, "Headers")?;
        let q = req.into_inner();
        if q.to_height < q.from_height {
            return Err(Status::invalid_argument("to_height is below from_height"));
        }
        if q.to_height - q.from_height >= MAX_HEADERS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_HEADERS} headers per call"
            )));
        }
        let headers = self
            .store
            .headers(&q.node_id, q.from_height, q.to_height)
            .map_err(internal)?;
        Ok(Response::new(HeadersResponse { headers }))
    }

    async fn events(
        &self,
        req: Request<EventsRequest>,
    ) -> Result<Response<EventsResponse>, Status> {
        self.admit(&req, "Events")?;
        let q = req.into_inner();
        let limit = if q.limit == 0 {
            1000
        } else {
            q.limit.min(MAX_EVENTS)
        };
        let events = self
            .store
            .events(&q.node_id, q.from_seq, limit as usize)
            .map_err(internal)?;
        Ok(Response::new(EventsResponse { events }))
    }

    async fn fleet(&self, req: Request<FleetRequest>) -> Result<Response<FleetResponse>, Status> {
        self.admit(&req, "Fleet")?;
        let networks = self
            .fleet
            .view(&req.get_ref().network, crate::model::now_unix_ms());
        Ok(Response::new(FleetResponse { networks }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<NodeFinding, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.admit(&req, "Watch")?;
        let network = req.into_inner().network;
        let stream =
            BroadcastStream::new(self.fleet.subscribe()).filter_map(move |item| match item {
                Ok(nf) => {
                    let net = nf
                        .finding
                        .as_ref()
                        .map(|f| f.network.as_str())
                        .unwrap_or("");
                    (network.is_empty() || network == net).then_some(Ok(nf))
                }
                // A watcher too slow for the stream is told so rather than silently skipped.
                Err(e) => Some(Err(Status::data_loss(format!("watch fell behind: {e}")))),
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
