//! `outpost query`: the operator's client for the query API, with tables
//! for people and JSON for scripts.

pub mod merge;

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};

use crate::cli::{Connection, QueryCommand};
use crate::model::{hex, now_unix_ms};
use crate::proto::{
    query_client::QueryClient, EventsRequest, Finding, FindingKind, FleetRequest, GetNodeRequest,
    Header, HeadersRequest, LatencySummary, ListFindingsRequest, ListNodesRequest, NetworkView,
    NodeStatus, NodeSummary, WatchRequest,
};
use crate::tls::TlsFiles;

/// A client of the first aggregator of `--endpoint`.
pub async fn connect(conn: &Connection) -> anyhow::Result<QueryClient<Channel>> {
    let first = conn
        .endpoint
        .first()
        .map(String::as_str)
        .unwrap_or_default();
    connect_to(conn, first).await
}

/// A client of the aggregator at `endpoint`, with `conn`'s certificates.
pub async fn connect_to(conn: &Connection, endpoint: &str) -> anyhow::Result<QueryClient<Channel>> {
    let (Some(cert), Some(key)) = (&conn.cert, &conn.key) else {
        bail!("an operator certificate is needed: pass --cert and --key (or set OUTPOST_CERT and OUTPOST_KEY)");
    };
    let files = TlsFiles {
        ca: conn.ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
        crl: None,
    };
    let domain = match &conn.server_name {
        Some(n) => n.clone(),
        None => reqwest::Url::parse(endpoint)
            .with_context(|| format!("--endpoint {:?} is not a URL", endpoint))?
            .host_str()
            .unwrap_or_default()
            .to_string(),
    };
    let tls = files.client_config(&domain)?;
    let channel = Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("--endpoint {:?} is not a URL", endpoint))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| {
            anyhow!(
                "cannot connect to {}: {} (check --endpoint, and that --ca signed the aggregator's certificate)",
                endpoint,
                crate::error_chain(&e)
            )
        })?;
    Ok(QueryClient::new(channel).max_decoding_message_size(64 << 20))
}

/// Asks every aggregator of `--endpoint` at once. Those that answer are
/// merged; each that does not is a warning on stderr, and only if none
/// answers is it an error.
async fn ask_all<T, F, Fut>(conn: &Connection, ask: F) -> anyhow::Result<Vec<(String, T)>>
where
    F: Fn(QueryClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let calls = conn.endpoint.iter().map(|ep| {
        let ask = &ask;
        async move {
            let client = connect_to(conn, ep).await?;
            ask(client).await.map_err(status_err)
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let mut answers = Vec::new();
    let mut failed = Vec::new();
    for (ep, r) in conn.endpoint.iter().zip(results) {
        match r {
            Ok(t) => answers.push((ep.clone(), t)),
            Err(e) => {
                eprintln!("warning: {ep} did not answer, the view lacks it: {e:#}");
                failed.push(format!("{ep}: {e:#}"));
            }
        }
    }
    if answers.is_empty() {
        bail!("no aggregator answered:\n{}", failed.join("\n"));
    }
    Ok(answers)
}

/// `query` over several aggregators: `nodes`, `node` and `fleet` merged.
async fn run_merged(conn: &Connection, cmd: QueryCommand) -> anyhow::Result<()> {
    let out = match cmd {
        QueryCommand::Nodes => {
            let answers = ask_all(conn, |mut c| async move {
                Ok(c.list_nodes(ListNodesRequest {}).await?.into_inner().nodes)
            })
            .await?;
            let merged = merge::nodes(&answers);
            if !conn.json {
                print!("{}", merged_nodes_table(&merged));
                return Ok(());
            }
            json!(merged
                .iter()
                .map(|m| {
                    let mut v = summary_json(&m.node);
                    v["aggregator"] = json!(m.from);
                    v["missing_at"] = json!(m.missing_at);
                    v
                })
                .collect::<Vec<_>>())
        }
        QueryCommand::Fleet { network } => {
            let network = network.unwrap_or_default();
            let answers = ask_all(conn, |mut c| {
                let network = network.clone();
                async move { Ok(c.fleet(FleetRequest { network }).await?.into_inner().networks) }
            })
            .await?;
            let networks = merge::fleet(&answers);
            if !conn.json {
                print!("{}", fleet_table(&networks));
                return Ok(());
            }
            networks_json(&networks)
        }
        QueryCommand::Node { node_id } => {
            let answers = ask_all(conn, |mut c| {
                let node_id = node_id.clone();
                async move {
                    match c.get_node(GetNodeRequest { node_id }).await {
                        Ok(d) => Ok(Some(d.into_inner())),
                        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                        Err(s) => Err(s),
                    }
                }
            })
            .await?;
            let Some((from, _)) = answers
                .iter()
                .filter_map(|(ep, d)| Some((ep, d.as_ref()?.summary.as_ref()?.last_seen_unix_ms)))
                .max_by_key(|(_, seen)| *seen)
            else {
                bail!("no aggregator of --endpoint knows node {node_id:?}");
            };
            let one = Connection {
                endpoint: vec![from.clone()],
                ..conn.clone()
            };
            return Box::pin(run(&one, QueryCommand::Node { node_id })).await;
        }
        other => bail!(
            "--endpoint names {} aggregators; only `query nodes`, `query node` and `query fleet` merge several (for `{}` name one)",
            conn.endpoint.len(),
            other.name()
        ),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unknown && s.message().contains("transport error") {
        // With TLS 1.3 the server checks our certificate after the client
        // thinks the handshake is done, so a refusal shows up on the first call.
        return anyhow!(
            "the aggregator closed the connection: {}; it refuses client certificates its CA did not issue (check --cert and --key)",
            crate::error_chain(&s)
        );
    }
    anyhow!("aggregator refused: {:?}: {}", s.code(), s.message())
}

/// Parses `--since`: an RFC 3339 time, or an age such as `10m`.
pub fn parse_since(s: &str) -> anyhow::Result<i64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        return Ok(ms);
    }
    let age = humantime::parse_duration(s)
        .map_err(|_| anyhow!("--since {s:?}: expected an RFC 3339 time or an age like 10m"))?;
    Ok(now_unix_ms() - age.as_millis() as i64)
}

pub async fn run(conn: &Connection, cmd: QueryCommand) -> anyhow::Result<()> {
    // Check arguments before connecting, so a typo does not wait for the network.
    let kind = match &cmd {
        QueryCommand::Findings { kind: Some(k), .. } => {
            Some(FindingKind::from_label(k).ok_or_else(|| {
                let kinds: Vec<&str> = crate::model::ALL_KINDS.iter().map(|k| k.label()).collect();
                anyhow!("--kind {k:?}: not a finding kind ({})", kinds.join(", "))
            })?)
        }
        _ => None,
    };
    let since = match &cmd {
        QueryCommand::Findings { since: Some(s), .. } => parse_since(s)?,
        _ => 0,
    };
    if conn.endpoint.len() > 1 {
        return run_merged(conn, cmd).await;
    }
    let mut client = connect(conn).await?;
    let out = match cmd {
        QueryCommand::Nodes => {
            let nodes = client
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .nodes;
            if conn.json {
                json!(nodes.iter().map(summary_json).collect::<Vec<_>>())
            } else {
                print!("{}", nodes_table(&nodes));
                return Ok(());
            }
        }
        QueryCommand::Node { node_id } => {
            let d = client
                .get_node(GetNodeRequest { node_id })
                .await
                .map_err(status_err)?
                .into_inner();
            let v = json!({
                "summary": d.summary.as_ref().map(summary_json),
                "status": d.status.as_ref().map(status_json),
                "open_findings": d.open_findings.iter().map(finding_json).collect::<Vec<_>>(),
                "agent_version": d.agent_version,
                "duplicates_ignored": d.duplicates_ignored,
                "dropped_events": d.dropped_events,
                "missing_events": d.missing_events,
                "redelivered_headers": d.redelivered_headers,
                "last_snapshot": d.last_snapshot.as_ref().map(|s| {
                    let mut v = snapshot_json(s);
                    v["at_unix_ms"] = json!(d.last_snapshot_at_unix_ms);
                    v
                }),
            });
            if conn.json {
                v
            } else {
                print!("{}", node_text(&v));
                return Ok(());
            }
        }
        QueryCommand::Findings { node, open, .. } => {
            let list = client
                .list_findings(ListFindingsRequest {
                    node_id: node.unwrap_or_default(),
                    kind: kind.map(|k| k as i32),
                    since_unix_ms: since,
                    open_only: open,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .findings;
            if conn.json {
                json!(list
                    .iter()
                    .map(|nf| {
                        let mut v = nf.finding.as_ref().map(finding_json).unwrap_or(Value::Null);
                        v["node_id"] = json!(nf.node_id);
                        v
                    })
                    .collect::<Vec<_>>())
            } else {
                for nf in &list {
                    if let Some(f) = &nf.finding {
                        println!("{}", finding_line(&nf.node_id, f));
                    }
                }
                return Ok(());
            }
        }
        QueryCommand::Headers { node_id, from, to } => {
            let headers = client
                .headers(HeadersRequest {
                    node_id,
                    from_height: from,
                    to_height: to,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .headers;
            if conn.json {
                json!(headers.iter().map(header_json).collect::<Vec<_>>())
            } else {
                for h in &headers {
                    println!(
                        "{:>10}  {}  parent {}",
                        h.height,
                        hex(&h.hash),
                        hex(&h.parent_hash)
                    );
                }
                return Ok(());
            }
        }
        QueryCommand::Fleet { network } => {
            let networks = client
                .fleet(FleetRequest {
                    network: network.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .networks;
            if conn.json {
                networks_json(&networks)
            } else {
                print!("{}", fleet_table(&networks));
                return Ok(());
            }
        }
        QueryCommand::Watch { network } => {
            let mut stream = client
                .watch(WatchRequest {
                    network: network.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            while let Some(nf) = stream.message().await.map_err(status_err)? {
                let Some(f) = &nf.finding else { continue };
                if conn.json {
                    let mut v = finding_json(f);
                    v["node_id"] = json!(nf.node_id);
                    println!("{v}");
                } else {
                    println!("{}", finding_line(&nf.node_id, f));
                }
            }
            return Ok(());
        }
        QueryCommand::Events {
            node_id,
            from_seq,
            limit,
        } => {
            let events = client
                .events(EventsRequest {
                    node_id,
                    from_seq,
                    limit,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .events;
            json!(events.iter().map(event_json).collect::<Vec<_>>())
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub fn header_json(h: &Header) -> Value {
    json!({"height": h.height, "hash": hex(&h.hash), "parent_hash": hex(&h.parent_hash), "timestamp": h.timestamp})
}

pub fn latency_json(l: &LatencySummary) -> Value {
    json!({"count": l.count, "p50_us": l.p50_us, "p90_us": l.p90_us, "p99_us": l.p99_us, "max_us": l.max_us})
}

pub fn status_json(s: &NodeStatus) -> Value {
    json!({
        "head_height": s.head_height,
        "head_hash": hex(&s.head_hash),
        "reachable": s.reachable,
        "peers": s.peers,
        "syncing": s.syncing,
        "sync_highest_block": s.sync_highest_block,
        "mempool_size": s.mempool_size,
        "rpc_latency": s.rpc_latency.as_ref().map(latency_json),
        "rpc_errors": s.rpc_errors,
        "rpc_methods": s.rpc_methods.iter().map(|m| json!({
            "method": m.method,
            "latency": m.latency.as_ref().map(latency_json),
            "errors": m.errors,
        })).collect::<Vec<_>>(),
        "validate_latency": s.validate_latency.as_ref().map(latency_json),
        "round_trip": s.round_trip.as_ref().map(latency_json),
        "dropped_events": s.dropped_events,
        "deliveries": s.deliveries.iter().map(|d| json!({
            "aggregator": d.aggregator,
            "acked_seq": d.acked_seq,
            "backlog": d.backlog,
            "connected": d.connected,
        })).collect::<Vec<_>>(),
        "host": s.host.as_ref().map(|h| json!({
            "cpu_percent": h.cpu_percent,
            "memory_percent": h.memory_percent,
            "disk_percent": h.disk_percent,
            "disk_path": h.disk_path,
            "node_cpu_percent": h.node_cpu_percent,
            "node_rss_bytes": h.node_rss_bytes,
            "outpost_cpu_percent": h.outpost_cpu_percent,
            "outpost_rss_bytes": h.outpost_rss_bytes,
        })),
    })
}

pub fn finding_json(f: &Finding) -> Value {
    json!({
        "id": f.id,
        "kind": f.kind().label(),
        "severity": f.severity().label(),
        "state": f.state().label(),
        "height": f.height,
        "opened_at_unix_ms": f.opened_at_unix_ms,
        "resolved_at_unix_ms": f.resolved_at_unix_ms,
        "summary": f.summary,
        "fork_point": f.fork_point,
        "depth": f.depth,
        "verdict": f.verdict().label(),
        "verdict_reason": f.verdict_reason,
        "network": f.network,
        "groups": f.groups.iter().map(|g| json!({
            "hash": hex(&g.hash),
            "node_ids": g.node_ids,
            "canonical": g.canonical,
        })).collect::<Vec<_>>(),
    })
}

/// The fleet view, as `query fleet --json` prints it.
pub fn networks_json(networks: &[NetworkView]) -> Value {
    json!(networks.iter().map(network_json).collect::<Vec<_>>())
}

pub fn network_json(n: &NetworkView) -> Value {
    json!({
        "network": n.network,
        "chain": n.chain,
        "fleet_head": n.fleet_head,
        "nodes": n.nodes.iter().map(|m| json!({
            "node_id": m.node_id,
            "height": m.height,
            "hash": hex(&m.hash),
            "lag": m.lag,
            "agrees": m.agrees,
            "status": m.status,
        })).collect::<Vec<_>>(),
        "open_findings": n.open_findings.iter().map(|nf| {
            let mut v = nf.finding.as_ref().map(finding_json).unwrap_or(Value::Null);
            v["node_id"] = json!(nf.node_id);
            v
        }).collect::<Vec<_>>(),
    })
}

pub fn fleet_table(networks: &[NetworkView]) -> String {
    let mut out = String::new();
    for n in networks {
        out.push_str(&format!(
            "{} ({}): fleet head {}\n  {:<16} {:>10} {:>5} {:<15} {:<6} {}\n",
            n.network, n.chain, n.fleet_head, "NODE", "HEIGHT", "LAG", "HASH", "AGREES", "STATUS"
        ));
        for m in &n.nodes {
            out.push_str(&format!(
                "  {:<16} {:>10} {:>5} {:<15} {:<6} {}\n",
                m.node_id,
                m.height,
                m.lag,
                short(&m.hash),
                if m.agrees { "yes" } else { "NO" },
                m.status
            ));
        }
        if n.open_findings.is_empty() {
            out.push_str("  open findings: none\n");
        } else {
            out.push_str("  open findings:\n");
            for nf in &n.open_findings {
                if let Some(f) = &nf.finding {
                    out.push_str(&format!("    {}\n", finding_line(&nf.node_id, f)));
                }
            }
        }
        out.push('\n');
    }
    out
}

pub fn summary_json(n: &NodeSummary) -> Value {
    json!({
        "node_id": n.node_id,
        "network": n.network,
        "chain": n.chain,
        "head": n.head.as_ref().map(header_json),
        "last_seen_unix_ms": n.last_seen_unix_ms,
        "status": n.status,
        "connected": n.connected,
        "last_seq": n.last_seq,
    })
}

fn snapshot_json(s: &crate::proto::SnapshotTaken) -> Value {
    json!({
        "file": s.file,
        "bytes": s.bytes,
        "duration_ms": s.duration_ms,
        "sha256": s.sha256,
        "last_seq": s.last_seq,
        "head_height": s.head_height,
    })
}

pub fn event_json(e: &crate::proto::Event) -> Value {
    use crate::proto::event::Kind;
    let (kind, body) = match &e.kind {
        Some(Kind::Header(h)) => ("header", header_json(h)),
        Some(Kind::Status(s)) => ("status", status_json(s)),
        Some(Kind::Finding(f)) => ("finding", finding_json(f)),
        Some(Kind::Gap(g)) => ("gap", json!({"last_seq": g.last_seq, "dropped": g.dropped})),
        Some(Kind::Snapshot(s)) => ("snapshot", snapshot_json(s)),
        Some(Kind::Resent(r)) => ("resent", json!({"height": r.height, "hash": hex(&r.hash)})),
        None => ("unknown", Value::Null),
    };
    json!({"seq": e.seq, "at_unix_ms": e.at_unix_ms, "kind": kind, "body": body})
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let secs = ((now_unix_ms() - ms).max(0) / 1000) as u64;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

fn short(hash: &[u8]) -> String {
    let h = hex(hash);
    if h.len() > 14 {
        format!("{}…{}", &h[..8], &h[h.len() - 4..])
    } else {
        h
    }
}

/// `nodes_table` for a merged answer: each node says which aggregator of
/// its network lacks it.
pub fn merged_nodes_table(nodes: &[merge::MergedNode]) -> String {
    let rows: Vec<(NodeSummary, String)> = nodes
        .iter()
        .map(|m| {
            let note = if m.missing_at.is_empty() {
                String::new()
            } else {
                format!("not at {}", m.missing_at.join(", "))
            };
            (m.node.clone(), note)
        })
        .collect();
    table_of(&rows)
}

pub fn nodes_table(nodes: &[NodeSummary]) -> String {
    let rows: Vec<(NodeSummary, String)> =
        nodes.iter().map(|n| (n.clone(), String::new())).collect();
    table_of(&rows)
}

fn table_of(nodes: &[(NodeSummary, String)]) -> String {
    let mut out = format!(
        "{:<16} {:<12} {:<10} {:>10} {:<15} {:<13} {:<10} {:>8}\n",
        "NODE", "NETWORK", "CHAIN", "HEIGHT", "HASH", "STATUS", "SEEN", "SEQ"
    );
    for (n, note) in nodes {
        let (height, hash) = n
            .head
            .as_ref()
            .map(|h| (h.height.to_string(), short(&h.hash)))
            .unwrap_or_else(|| ("-".into(), "-".into()));
        let line = format!(
            "{:<16} {:<12} {:<10} {:>10} {:<15} {:<13} {:<10} {:>8}",
            n.node_id,
            n.network,
            n.chain,
            height,
            hash,
            n.status,
            ago(n.last_seen_unix_ms),
            n.last_seq
        );
        if note.is_empty() {
            out.push_str(&format!("{line}\n"));
        } else {
            out.push_str(&format!("{line}  {note}\n"));
        }
    }
    out
}

pub fn finding_line(node: &str, f: &Finding) -> String {
    let when = if f.state() == crate::proto::FindingState::Resolved {
        f.resolved_at_unix_ms
    } else {
        f.opened_at_unix_ms
    };
    let who = if node.is_empty() {
        format!("@{}", f.network)
    } else {
        node.to_string()
    };
    let fault = if f.verdict() == crate::proto::Verdict::Unspecified {
        String::new()
    } else {
        format!(" [fault: {}]", f.verdict().label())
    };
    format!(
        "{:<9} {:<16} {:<13} {:<8} {:<9} h={:<9} {}{fault}",
        ago(when),
        who,
        f.kind().label(),
        f.severity().label(),
        f.state().label(),
        f.height,
        f.summary
    )
}

fn node_text(v: &Value) -> String {
    let s = &v["summary"];
    let st = &v["status"];
    let lat = &st["rpc_latency"];
    let mut out = format!(
        "node      {}\nnetwork   {}\nchain     {}\nstatus    {}\nhead      {} {}\npeers     {}\nsyncing   {}\nmempool   {}\nrpc p50/p99  {} / {} µs ({} calls in the last interval)\nlast seq  {}\nagent     {}\ndropped   {}   duplicates ignored {}   headers sent again {}   missing (seq gaps) {}\n",
        s["node_id"].as_str().unwrap_or(""),
        s["network"].as_str().unwrap_or(""),
        s["chain"].as_str().unwrap_or(""),
        s["status"].as_str().unwrap_or(""),
        s["head"]["height"],
        s["head"]["hash"].as_str().unwrap_or(""),
        if st["peers"].is_null() { "unknown".to_string() } else { st["peers"].to_string() },
        if st["syncing"].is_null() { "unknown".to_string() } else { st["syncing"].to_string() },
        if st["mempool_size"].is_null() { "unknown".to_string() } else { format!("{} transactions", st["mempool_size"]) },
        lat["p50_us"],
        lat["p99_us"],
        lat["count"],
        s["last_seq"],
        v["agent_version"].as_str().unwrap_or(""),
        v["dropped_events"],
        v["duplicates_ignored"],
        v["redelivered_headers"],
        v["missing_events"],
    );
    let line = |name: &str, l: &Value, extra: String| {
        let n = |k: &str| l[k].as_u64().unwrap_or(0);
        format!(
            "  {name:<22} p50 {:>7}  p90 {:>7}  p99 {:>7}  max {:>7} µs  n {}{extra}\n",
            n("p50_us"),
            n("p90_us"),
            n("p99_us"),
            n("max_us"),
            n("count")
        )
    };
    for d in st["deliveries"].as_array().cloned().unwrap_or_default() {
        out.push_str(&format!(
            "delivery  {}  {}  holds seq {}  backlog {}\n",
            d["aggregator"].as_str().unwrap_or(""),
            if d["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "not connected"
            },
            d["acked_seq"],
            d["backlog"],
        ));
    }
    out.push_str("timings (last interval):\n");
    for m in st["rpc_methods"].as_array().cloned().unwrap_or_default() {
        let errors = m["errors"].as_u64().unwrap_or(0);
        let extra = if errors > 0 {
            format!("  errors {errors}")
        } else {
            String::new()
        };
        out.push_str(&line(
            m["method"].as_str().unwrap_or(""),
            &m["latency"],
            extra,
        ));
    }
    if !st["validate_latency"].is_null() {
        out.push_str(&line(
            "validate per header",
            &st["validate_latency"],
            String::new(),
        ));
    }
    if !st["round_trip"].is_null() {
        out.push_str(&line(
            "stream send to ack",
            &st["round_trip"],
            String::new(),
        ));
    }
    let host = &st["host"];
    if !host.is_null() {
        let pct = |v: &Value| v.as_f64().map_or("-".into(), |p| format!("{p:.1} %"));
        let mib = |v: &Value| {
            v.as_u64()
                .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
        };
        out.push_str(&format!(
            "host      cpu {}  memory {}  disk {} ({})\nprocesses node cpu {} rss {}   outpost cpu {} rss {}\n",
            pct(&host["cpu_percent"]),
            pct(&host["memory_percent"]),
            pct(&host["disk_percent"]),
            host["disk_path"].as_str().unwrap_or(""),
            pct(&host["node_cpu_percent"]),
            mib(&host["node_rss_bytes"]),
            pct(&host["outpost_cpu_percent"]),
            mib(&host["outpost_rss_bytes"]),
        ));
    }
    let snap = &v["last_snapshot"];
    if snap.is_null() {
        out.push_str(
            "snapshot  none reported
",
        );
    } else {
        out.push_str(&format!(
            "snapshot  {} ({} bytes, {} ms, last seq {}, head {}) sha256 {}\n",
            snap["file"].as_str().unwrap_or(""),
            snap["bytes"],
            snap["duration_ms"],
            snap["last_seq"],
            snap["head_height"],
            snap["sha256"].as_str().unwrap_or(""),
        ));
    }
    let open = v["open_findings"].as_array().cloned().unwrap_or_default();
    if open.is_empty() {
        out.push_str("open findings: none\n");
    } else {
        out.push_str("open findings:\n");
        for f in open {
            out.push_str(&format!(
                "  {} {} {}\n",
                f["kind"].as_str().unwrap_or(""),
                f["severity"].as_str().unwrap_or(""),
                f["summary"].as_str().unwrap_or("")
            ));
        }
    }
    out
}
