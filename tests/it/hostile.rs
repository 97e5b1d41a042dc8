//! Peers that lie on purpose: a node that reports absurd heights, and two
//! agent processes that share one node's certificate.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::proto::{FindingKind, FindingState, GetNodeRequest, ListNodesRequest};
use serde_json::{json, Value};

use crate::harness::{http_fixture, wait_for, Agent, AgentOptions, Aggregator, Anvil, World};
use crate::spine::{node, wait_finding};

/// An Ethereum JSON-RPC node whose chain has one hash per height and whose
/// head is whatever `head` holds.
async fn told_node(head: Arc<AtomicU64>) -> String {
    let hash = |h: u64| format!("0x{:048x}{h:016x}", 0xabu64);
    http_fixture(move |req| {
        let head = head.clone();
        async move {
            let r: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let result = match r["method"].as_str().unwrap_or("") {
                "eth_blockNumber" => json!(format!("0x{:x}", head.load(SeqCst))),
                "eth_getBlockByNumber" => {
                    let s = r["params"][0].as_str().unwrap_or("0x0");
                    let h = u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or(0);
                    json!({
                        "number": format!("0x{h:x}"),
                        "hash": hash(h),
                        "parentHash": hash(h.wrapping_sub(1)),
                        "timestamp": format!("0x{:x}", outpost::model::now_unix_ms() / 1000),
                    })
                }
                "eth_chainId" => json!("0x7a69"),
                "eth_syncing" => json!(false),
                _ => {
                    return (
                        200,
                        serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": r["id"], "error": {"code": -32601, "message": "no such method"}})).unwrap(),
                    )
                }
            };
            (
                200,
                serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": r["id"], "result": result}))
                    .unwrap(),
            )
        }
    })
    .await
}

#[tokio::test]
async fn a_node_that_reports_absurd_heights_is_flagged_and_blinds_nobody() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let head = Arc::new(AtomicU64::new(1 << 60));
    let url = told_node(head.clone()).await;
    let mut liar = Agent::start(&world, "liar", &url, &agg, AgentOptions::default());
    let mut honest = Agent::start(&world, "honest", &anvil.url(), &agg, Default::default());
    let mut q = world.query(&agg).await;
    let (liar_log, honest_log) = (liar.log.clone(), honest.log.clone());
    let logs = [liar_log.as_path(), honest_log.as_path(), agg.log.as_path()];

    // 2^60 on a fresh store: flagged, not stored.
    let f = wait_finding(
        &q,
        "liar",
        FindingKind::ImplausibleHead,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        f.summary.contains("no chain can have reached"),
        "{}",
        f.summary
    );
    // Then an honest height: the finding resolves and the head is stored.
    head.store(5, SeqCst);
    wait_finding(
        &q,
        "liar",
        FindingKind::ImplausibleHead,
        FindingState::Resolved,
        &logs,
    )
    .await;
    wait_for("liar's head at 5", Duration::from_secs(30), &logs, || {
        let mut c = q.clone();
        async move {
            node(&mut c, "liar")
                .await
                .filter(|n| n.head.as_ref().is_some_and(|h| h.height == 5))
        }
    })
    .await;
    // A head near u64::MAX, and one far above what 12 s blocks allow: the
    // agent stays up and keeps its stored head.
    for lie in [u64::MAX - 3, 5 + 100_000_000] {
        head.store(lie, SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let d = q
            .get_node(GetNodeRequest {
                node_id: "liar".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            d.open_findings
                .iter()
                .any(|f| f.kind() == FindingKind::ImplausibleHead),
            "lie {lie}: {:?}",
            d.open_findings
        );
        assert_eq!(d.summary.unwrap().head.unwrap().height, 5, "lie {lie}");
        assert!(liar.running(), "the agent survives head {lie}");
    }
    // The rest of the fleet stays queryable within a second throughout.
    anvil.mine(3).await;
    crate::spine::wait_at_head(&mut q, &anvil, &honest, &agg).await;
    let started = Instant::now();
    q.list_nodes(ListNodesRequest {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(honest.running() && liar.running());
}

#[tokio::test]
async fn a_second_agent_with_one_node_id_is_refused_and_loses_nothing() {
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    anvil.mine(2).await;
    let agg = Aggregator::start(&world).await;
    let mut first = Agent::start(&world, "node-1", &anvil.url(), &agg, Default::default());
    let mut q = world.query(&agg).await;
    crate::spine::wait_at_head(&mut q, &anvil, &first, &agg).await;

    // A clone: the same certificate and config, its own data dir.
    let clone_cfg = world.path().join("clone.toml");
    let text = std::fs::read_to_string(&first.config).unwrap().replace(
        &format!("data_dir = \"{}\"", first.data_dir.display()),
        &format!(
            "data_dir = \"{}\"",
            world.path().join("clone-data").display()
        ),
    );
    std::fs::write(&clone_cfg, text).unwrap();
    let clone_log = world.path().join("clone.log");
    let mut clone = crate::harness::spawn_agent(&clone_cfg, &clone_log);
    let first_log = first.log.clone();
    let logs = [first_log.as_path(), clone_log.as_path(), agg.log.as_path()];
    let f = wait_finding(
        &q,
        "node-1",
        FindingKind::DuplicateAgent,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(f.summary.contains("second agent"), "{}", f.summary);
    let clone_text = std::fs::read_to_string(&clone_log).unwrap();
    assert!(
        clone_text.contains("aggregator refused the stream: another agent")
            && clone_text.contains("is streaming as node"),
        "the refused agent says why: {clone_text}"
    );
    let audit = std::fs::read_to_string(&agg.log).unwrap();
    assert!(
        audit.contains("refused: a second agent with this node id"),
        "{audit}"
    );

    // The clone keeps what it read; once the first stops, it takes over
    // and delivers it, with seqs that follow the first agent's.
    anvil.mine(2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.terminate();
    let top = anvil.head().await;
    wait_for(
        "the clone delivers its events",
        Duration::from_secs(60),
        &logs,
        || {
            let mut c = q.clone();
            async move {
                node(&mut c, "node-1")
                    .await
                    .filter(|n| n.connected && n.head.as_ref().is_some_and(|h| h.height == top))
            }
        },
    )
    .await;
    let d = q
        .get_node(GetNodeRequest {
            node_id: "node-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.missing_events, 0, "no seq gap: nothing lost");
    let _ = clone.kill();
    let _ = clone.wait();
}

/// A TLS connection to the aggregator without a client certificate.
async fn tls_without_cert(
    world: &World,
    agg: &Aggregator,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(world.pki().ca_cert()).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", agg.port)).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
}

/// Whether the peer closes `io` within `within` (EOF or an error), rather
/// than sending bytes or keeping quiet.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(io: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, io.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // HTTP/2 settings from the server: read on.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn past_its_connection_limits_the_aggregator_refuses_new_work_and_serves_the_rest() {
    outpost::tls::install_crypto_provider();
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start_with(
        &world,
        "[limits]\nmax_connections = 12\nmax_connections_per_identity = 2\nmax_unauthenticated = 3\nunauthenticated_lifetime = \"2s\"\nhandshake_timeout = \"2s\"\n",
    )
    .await;
    let agent = Agent::start(&world, "node-1", &anvil.url(), &agg, Default::default());
    let mut q = world.query(&agg).await;
    crate::spine::wait_at_head(&mut q, &anvil, &agent, &agg).await;

    // Without a certificate: three are held (then closed after their
    // lifetime), a fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls_without_cert(&world, &agg).await.unwrap());
    }
    let mut fourth = tls_without_cert(&world, &agg).await.unwrap();
    assert!(
        closed_within(&mut fourth, Duration::from_secs(1)).await,
        "over max_unauthenticated"
    );
    for c in &mut held {
        assert!(
            !closed_within(c, Duration::from_millis(300)).await,
            "within the cap"
        );
    }
    // Idle sockets that never start TLS fill the connection cap; the next
    // one is closed at once, and the idle ones at the handshake deadline.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", agg.port))
                .await
                .unwrap(),
        );
    }
    let mut over = tokio::net::TcpStream::connect(("127.0.0.1", agg.port))
        .await
        .unwrap();
    assert!(
        closed_within(&mut over, Duration::from_secs(1)).await,
        "over max_connections"
    );
    // Meanwhile the agent's stream and the operator's queries go on.
    anvil.mine(3).await;
    crate::spine::wait_at_head(&mut q, &anvil, &agent, &agg).await;
    let started = Instant::now();
    q.list_nodes(ListNodesRequest {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    for c in &mut held {
        assert!(
            closed_within(c, Duration::from_secs(4)).await,
            "unauthenticated lifetime"
        );
    }
    for c in &mut idle {
        assert!(
            closed_within(c, Duration::from_secs(4)).await,
            "handshake deadline"
        );
    }
    let metrics = agg.metrics().await;
    for reason in ["connections", "identity-connections", "handshake-timeout"] {
        assert!(
            metrics.contains(&format!(
                "outpost_ingest_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }
    let audit = std::fs::read_to_string(&agg.log).unwrap();
    assert!(audit.contains("limits.max_connections"), "{audit}");
}

#[tokio::test]
async fn messages_that_would_decode_to_gigabytes_are_refused_before_decoding() {
    use outpost::proto::{
        agent_message, ingest_client::IngestClient, AgentMessage, Batch, Event, Hello,
    };
    outpost::tls::install_crypto_provider();
    let world = World::new();
    let anvil = Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let honest = Agent::start(&world, "node-1", &anvil.url(), &agg, Default::default());
    let mut q = world.query(&agg).await;
    crate::spine::wait_at_head(&mut q, &anvil, &honest, &agg).await;
    let before = agg.rss_bytes();

    world.issue(&outpost::tls::Identity::Agent("bulk".into()));
    let tls = crate::harness::client_tls(&world.pki(), "agent-bulk");
    let attack = |body: AgentMessage| {
        let tls = tls.clone();
        let port = agg.port;
        async move {
            let ch = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let hello = AgentMessage {
                body: Some(agent_message::Body::Hello(Hello {
                    node_id: "bulk".into(),
                    network: "devnet".into(),
                    chain: "ethereum".into(),
                    instance_id: "attacker".into(),
                    ..Default::default()
                })),
            };
            let mut inbound = IngestClient::new(ch)
                .max_encoding_message_size(usize::MAX)
                .report(tokio_stream::iter(vec![hello, body]).chain(tokio_stream::pending()))
                .await
                .unwrap()
                .into_inner();
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(s) => return Some(s),
                }
            }
        }
    };
    use tokio_stream::StreamExt as _;
    // 1,000,000 empty events: about 2 MB on the wire, some 400 MB decoded.
    let empty = AgentMessage {
        body: Some(agent_message::Body::Batch(Batch {
            events: vec![Event::default(); 1_000_000],
            ..Default::default()
        })),
    };
    let s = attack(empty).await.expect("refused");
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("nested messages"), "{}", s.message());
    // 64 MiB in one message: over the byte limit.
    let big = AgentMessage {
        body: Some(agent_message::Body::Batch(Batch {
            events: vec![Event {
                seq: 1,
                kind: Some(outpost::proto::event::Kind::Header(
                    outpost::proto::Header {
                        height: 1,
                        hash: vec![7; 64 << 20],
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        })),
    };
    let s = attack(big).await.expect("refused");
    assert_ne!(s.code(), tonic::Code::Ok, "{s:?}");
    // Nothing of either was stored, the honest agent goes on, and the
    // aggregator's memory did not follow the attack.
    assert!(node(&mut q, "bulk").await.is_none_or(|n| n.last_seq == 0));
    anvil.mine(2).await;
    crate::spine::wait_at_head(&mut q, &anvil, &honest, &agg).await;
    let after = agg.rss_bytes();
    assert!(
        after < before + (64 << 20),
        "RSS went from {} to {} MiB",
        before >> 20,
        after >> 20
    );
    let audit = std::fs::read_to_string(&agg.log).unwrap();
    assert!(audit.contains("refused a message"), "{audit}");
}

#[tokio::test]
async fn a_seq_gap_is_a_finding_a_counter_and_a_figure_of_the_node() {
    use outpost::proto::{
        agent_message, ingest_client::IngestClient, AgentMessage, Batch, Event, Hello,
    };
    use tokio_stream::StreamExt as _;
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let ch = crate::harness::agent_channel(&world, &agg, "gappy").await;
    let header = |seq: u64| Event {
        seq,
        kind: Some(outpost::proto::event::Kind::Header(
            outpost::proto::Header {
                height: seq,
                hash: vec![seq as u8; 32],
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let msg = |body| AgentMessage { body: Some(body) };
    let hello = msg(agent_message::Body::Hello(Hello {
        node_id: "gappy".into(),
        network: "devnet".into(),
        chain: "ethereum".into(),
        instance_id: "one".into(),
        ..Default::default()
    }));
    // Seqs 1, 2, then 5: 3 and 4 never come, and no gap event covers them.
    let batch = msg(agent_message::Body::Batch(Batch {
        events: vec![header(1), header(2), header(5)],
        ..Default::default()
    }));
    let mut inbound = IngestClient::new(ch)
        .report(tokio_stream::iter(vec![hello, batch]).chain(tokio_stream::pending()))
        .await
        .unwrap()
        .into_inner();
    // Welcome, then the ack of seq 5.
    inbound.message().await.unwrap();
    inbound.message().await.unwrap();
    let q = world.query(&agg).await;
    let logs = [agg.log.as_path()];
    let f = wait_finding(
        &q,
        "gappy",
        FindingKind::SeqGap,
        FindingState::Occurred,
        &logs,
    )
    .await;
    assert!(f.summary.contains("events 3..=4"), "{}", f.summary);
    assert_eq!(f.verdict(), outpost::proto::Verdict::MonitoringPath);
    let d = q
        .clone()
        .get_node(GetNodeRequest {
            node_id: "gappy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.missing_events, 2);
    let metrics = agg.metrics().await;
    assert!(
        metrics
            .contains("outpost_ingest_missing_events_total{network=\"devnet\",node=\"gappy\"} 2"),
        "{metrics}"
    );
}

/// An agent that says Hello and dies before its first batch is still a
/// node of the fleet: its silence opens agent-silent.
#[tokio::test]
async fn an_agent_gone_before_its_first_batch_is_silent() {
    use outpost::proto::{agent_message, ingest_client::IngestClient, AgentMessage, Hello};
    use tokio_stream::StreamExt as _;
    let world = World::new();
    let agg = Aggregator::start_with(&world, "[fleet]\nsilent_after = \"2s\"\n").await;
    let ch = crate::harness::agent_channel(&world, &agg, "ghost").await;
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            node_id: "ghost".into(),
            network: "devnet".into(),
            chain: "ethereum".into(),
            instance_id: "one".into(),
            ..Default::default()
        })),
    };
    let mut inbound = IngestClient::new(ch)
        .report(tokio_stream::iter(vec![hello]).chain(tokio_stream::pending()))
        .await
        .unwrap()
        .into_inner();
    inbound.message().await.unwrap();
    drop(inbound);
    let q = world.query(&agg).await;
    let logs = [agg.log.as_path()];
    let f = wait_finding(
        &q,
        "ghost",
        FindingKind::AgentSilent,
        FindingState::Open,
        &logs,
    )
    .await;
    assert_eq!(f.network, "devnet");
}
