//! Report: the agent's end of the delivery streams, one per aggregator in
//! `report.aggregator`. Each sends only events the store has made durable,
//! resumes after its aggregator's last stored seq, sends heartbeats when
//! idle, and reconnects with its own jittered backoff; one aggregator down
//! or slow holds back none of the others. The store deletes what every
//! aggregator has acknowledged.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix::prelude::*;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use super::Ping;
use crate::config::ReportConfig;
use crate::latency::Latency;
use crate::model::now_unix_ms;
use crate::proto::{
    agent_message, aggregator_message, ingest_client::IngestClient, AgentMessage, Batch, Heartbeat,
    Hello,
};
use crate::store::local::{event_last_seq, LocalStore};
use crate::store::StoreError;

/// Batches sent but not yet acknowledged, at most. The aggregator acknowledges
/// after a flush, so the window must cover a flush's worth of batches: on
/// loopback 8 gave 115-150k durable events/s, 32 gave 260k, 64 gave 273k.
const WINDOW: usize = 32;
/// Messages queued for the gRPC encoder; the window bounds the rest.
const SEND_QUEUE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot connect to the aggregator at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("aggregator refused the stream: {0}")]
    Refused(String),
    #[error("stream broke: {0}")]
    Stream(String),
    #[error("aggregator broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS files: {0}")]
    Tls(String),
}

/// Who we are, for the Hello.
#[derive(Clone)]
pub struct Identity {
    pub node_id: String,
    pub network: String,
    pub chain: String,
}

pub struct Report {
    cfg: ReportConfig,
    me: Identity,
    store: LocalStore,
    span: tracing::Span,
    shutdown: watch::Sender<bool>,
    round_trip: Latency,
}

impl Report {
    pub fn new(
        cfg: ReportConfig,
        me: Identity,
        store: LocalStore,
        round_trip: Latency,
        span: tracing::Span,
    ) -> Report {
        Report {
            cfg,
            me,
            store,
            round_trip,
            span,
            shutdown: watch::channel(false).0,
        }
    }
}

impl Actor for Report {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let run = run(
            self.cfg.clone(),
            self.me.clone(),
            self.store.clone(),
            self.shutdown.subscribe(),
            self.round_trip.clone(),
        )
        .instrument(self.span.clone());
        ctx.spawn(run.into_actor(self).map(|_, act, ctx| {
            if !*act.shutdown.borrow() {
                ctx.stop();
            }
        }));
    }
}

impl Supervised for Report {
    fn restarting(&mut self, _: &mut Context<Self>) {
        let _g = self.span.enter();
        tracing::warn!("report restarting");
    }
}

impl Handler<Ping> for Report {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

/// Ends the stream cleanly: stops sending, waits briefly for the last acks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Report {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.shutdown.send_replace(true);
        let store = self.store.clone();
        Box::pin(async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while store.deliveries().iter().any(|d| d.connected) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
}

/// Delivers the outbox to every aggregator until `shutdown` turns true.
/// The store keeps which streams are up; `round_trip` times each batch from
/// sending to its acknowledgement.
pub async fn run(
    cfg: ReportConfig,
    me: Identity,
    store: LocalStore,
    shutdown: watch::Receiver<bool>,
    round_trip: Latency,
) {
    let urls = cfg.aggregator.urls().to_vec();
    store.deliver_to(&urls);
    let each = urls.iter().enumerate().map(|(to, url)| {
        deliver(
            &cfg,
            &me,
            &store,
            Destination { to, url },
            shutdown.clone(),
            &round_trip,
        )
        .instrument(tracing::info_span!("aggregator", url = %url))
    });
    futures_util::future::join_all(each).await;
}

/// One aggregator of `report.aggregator`: its place in the list and its URL.
#[derive(Clone, Copy)]
struct Destination<'a> {
    to: usize,
    url: &'a str,
}

/// Delivers the outbox to one aggregator, reconnecting as needed.
async fn deliver(
    cfg: &ReportConfig,
    me: &Identity,
    store: &LocalStore,
    dest: Destination<'_>,
    mut shutdown: watch::Receiver<bool>,
    round_trip: &Latency,
) {
    let backoff = || {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(cfg.reconnect_min)
            .with_max_delay(cfg.reconnect_max)
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let result = session(cfg, me, store, dest, &mut shutdown, round_trip).await;
        store.set_connected(dest.to, false);
        match result {
            Ok(()) => return,
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    delays = backoff();
                }
                let delay = delays.next().unwrap_or(cfg.reconnect_max);
                tracing::warn!(retry_in_ms = delay.as_millis() as u64, "{e}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

/// A channel to the aggregator at `url`.
pub async fn connect(cfg: &ReportConfig, url: &str) -> Result<Channel, ReportError> {
    let domain = match &cfg.server_name {
        Some(name) => name.clone(),
        None => reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default(),
    };
    let tls = cfg
        .tls()
        .client_config(&domain)
        .map_err(|e| ReportError::Tls(e.to_string()))?;
    let connect_err = |e: tonic::transport::Error| ReportError::Connect {
        url: url.to_string(),
        detail: crate::error_chain(&e),
    };
    Endpoint::from_shared(url.to_string())
        .map_err(connect_err)?
        .tls_config(tls)
        .map_err(connect_err)?
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(connect_err)
}

/// This process's instance id: random, made once per start, the same on
/// every reconnect. The aggregator tells a reconnect of this process (same
/// id) from a second process with the same certificate (another id).
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| crate::model::hex(&rand::random::<[u8; 16]>()))
}

fn status_error(s: tonic::Status) -> ReportError {
    match s.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied
        | tonic::Code::AlreadyExists
        | tonic::Code::InvalidArgument => ReportError::Refused(s.message().to_string()),
        // A transport error hides its cause (a TLS alert: a revoked or
        // expired certificate) in its sources.
        _ => ReportError::Stream(match std::error::Error::source(&s) {
            Some(cause) => format!("{}: {}", s.message(), crate::error_chain(cause)),
            None => format!("{}: {}", s.code(), s.message()),
        }),
    }
}

/// One connection's life; the store marks it up once its Welcome is in.
/// Returns Ok only on a clean shutdown.
async fn session(
    cfg: &ReportConfig,
    me: &Identity,
    store: &LocalStore,
    dest: Destination<'_>,
    shutdown: &mut watch::Receiver<bool>,
    round_trip: &Latency,
) -> Result<(), ReportError> {
    let channel = connect(cfg, dest.url).await?;
    let mut client = IngestClient::new(channel)
        .max_decoding_message_size(crate::wire::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::wire::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<AgentMessage>(SEND_QUEUE);
    let hello = Hello {
        node_id: me.node_id.clone(),
        network: me.network.clone(),
        chain: me.chain.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        local_last_seq: store.last_seq(),
        instance_id: instance_id().to_string(),
    };
    send(&tx, agent_message::Body::Hello(hello)).await?;
    let mut inbound = client
        .report(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    let welcome = match tokio::time::timeout(Duration::from_secs(15), inbound.message()).await {
        Err(_) => return Err(ReportError::Protocol("no Welcome within 15 s".into())),
        Ok(Err(s)) => return Err(status_error(s)),
        Ok(Ok(None)) => return Err(ReportError::Stream("closed before Welcome".into())),
        Ok(Ok(Some(m))) => match m.body {
            Some(aggregator_message::Body::Welcome(w)) => w,
            _ => {
                return Err(ReportError::Protocol(
                    "first message was not Welcome".into(),
                ))
            }
        },
    };
    let resume = welcome.last_stored_seq;
    store.reconcile(dest.to, resume).await?;
    store.set_connected(dest.to, true);
    tracing::info!(
        aggregator = %dest.url,
        resume_after = resume,
        local_last_seq = store.last_seq(),
        "connected to the aggregator"
    );

    let mut durable = store.durable();
    let mut sent_upto = resume;
    // Last seq and send time of each batch sent and not yet acknowledged,
    // oldest first.
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
    let acked = |in_flight: &mut VecDeque<(u64, Instant)>, upto: u64| {
        while let Some((_, sent)) = in_flight.front().filter(|(l, _)| *l <= upto) {
            round_trip.record(sent.elapsed());
            in_flight.pop_front();
        }
    };
    let mut last_send = Instant::now();
    let mut heartbeat = tokio::time::interval(cfg.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let upto = *durable.borrow_and_update();
        while sent_upto < upto && in_flight.len() < WINDOW {
            let mut events = Vec::new();
            for rec in store.records_after(sent_upto, cfg.batch_max_events)? {
                events.extend(
                    rec.batch
                        .events
                        .into_iter()
                        .filter(|e| event_last_seq(e) <= upto),
                );
            }
            // A record may hold more events than a batch may carry; the
            // rest go in the next batch (the outbox is read by seq).
            events.truncate(cfg.batch_max_events);
            events.truncate(crate::wire::fitting(&events, cfg.batch_max_bytes));
            let Some(last) = events.last().map(event_last_seq) else {
                break;
            };
            sent_upto = last;
            let pending = upto - last;
            send(&tx, agent_message::Body::Batch(Batch { events, pending })).await?;
            in_flight.push_back((last, Instant::now()));
            last_send = Instant::now();
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.body {
                    Some(aggregator_message::Body::Ack(ack)) => {
                        if ack.upto_seq > sent_upto {
                            return Err(ReportError::Protocol(format!(
                                "ack for seq {} beyond what was sent ({sent_upto})", ack.upto_seq
                            )));
                        }
                        store.ack(dest.to, ack.upto_seq).await?;
                        acked(&mut in_flight, ack.upto_seq);
                    }
                    _ => return Err(ReportError::Protocol("unexpected message after Welcome".into())),
                },
                Ok(None) => return Err(ReportError::Stream("aggregator closed the stream".into())),
                Err(s) => return Err(status_error(s)),
            },
            changed = durable.changed() => {
                if changed.is_err() {
                    return Err(ReportError::Stream("store closed".into()));
                }
            }
            _ = heartbeat.tick() => {
                if last_send.elapsed() >= cfg.heartbeat_interval {
                    send(&tx, agent_message::Body::Heartbeat(Heartbeat { at_unix_ms: now_unix_ms() })).await?;
                    last_send = Instant::now();
                }
            }
            _ = shutdown.changed() => {
                drop(tx);
                // Collect the acks still on their way, briefly.
                let deadline = tokio::time::sleep(Duration::from_secs(3));
                tokio::pin!(deadline);
                while !in_flight.is_empty() {
                    tokio::select! {
                        msg = inbound.message() => match msg {
                            Ok(Some(m)) => if let Some(aggregator_message::Body::Ack(ack)) = m.body {
                                store.ack(dest.to, ack.upto_seq).await?;
                                acked(&mut in_flight, ack.upto_seq);
                            },
                            _ => break,
                        },
                        _ = &mut deadline => break,
                    }
                }
                tracing::info!(sent_upto, "stream closed for shutdown");
                return Ok(());
            }
        }
    }
}

async fn send(
    tx: &mpsc::Sender<AgentMessage>,
    body: agent_message::Body,
) -> Result<(), ReportError> {
    tx.send(AgentMessage { body: Some(body) })
        .await
        .map_err(|_| ReportError::Stream("request stream closed".into()))
}
