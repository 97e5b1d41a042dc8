//! Simulated chains for `outpost demo`: small in-process nodes that speak
//! Ethereum JSON-RPC over HTTP on loopback, so the demo exercises the real
//! ingest path. Tests use real nodes, never these.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// How a simulated node behaves.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// A block every `block_time`.
    Steady,
    /// Like `Steady`, but every `every` blocks the last `depth` blocks are replaced.
    Reorg { every: u64, depth: u64 },
    /// Produces blocks `factor` times slower than the others.
    Lag { factor: u32 },
}

const GENESIS_TIME: u64 = 1_700_000_000;

struct Block {
    hash: [u8; 32],
    parent: [u8; 32],
    timestamp: u64,
}

struct Chain {
    blocks: Vec<Block>,
    reorgs: u64,
}

impl Chain {
    fn new() -> Chain {
        let mut c = Chain {
            blocks: Vec::new(),
            reorgs: 0,
        };
        c.push();
        c
    }

    /// Block contents depend only on height and branch, so simulated nodes
    /// that never reorg agree on every hash.
    fn push(&mut self) {
        let height = self.blocks.len() as u64;
        let parent = self.blocks.last().map(|b| b.hash).unwrap_or([0; 32]);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&parent);
        ctx.update(&height.to_be_bytes());
        ctx.update(&self.reorgs.to_be_bytes());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(ctx.finish().as_ref());
        self.blocks.push(Block {
            hash,
            parent,
            timestamp: GENESIS_TIME + height * 12,
        });
    }

    fn reorg(&mut self, depth: u64) {
        let keep = self.blocks.len().saturating_sub(depth as usize).max(1);
        let replaced = self.blocks.len() - keep;
        self.blocks.truncate(keep);
        self.reorgs += 1;
        for _ in 0..replaced {
            self.push();
        }
    }
}

/// A running simulated node. Dropping it stops the block producer and server.
pub struct SimNode {
    pub url: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SimNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SimNode {
    pub async fn start(behaviour: Behaviour, block_time: Duration) -> std::io::Result<SimNode> {
        let chain = Arc::new(Mutex::new(Chain::new()));
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let producer = tokio::spawn(produce(chain.clone(), behaviour, block_time));
        let server = tokio::spawn(serve(listener, chain));
        Ok(SimNode {
            url,
            tasks: vec![producer, server],
        })
    }
}

async fn produce(chain: Arc<Mutex<Chain>>, behaviour: Behaviour, block_time: Duration) {
    let interval = match behaviour {
        Behaviour::Lag { factor } => block_time * factor,
        _ => block_time,
    };
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Ok(mut c) = chain.lock() else { return };
        c.push();
        if let Behaviour::Reorg { every, depth } = behaviour {
            let height = c.blocks.len() as u64 - 1;
            if every > 0 && height % every == 0 {
                c.reorg(depth);
            }
        }
    }
}

async fn serve(listener: TcpListener, chain: Arc<Mutex<Chain>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let chain = chain.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let chain = chain.clone();
                async move { Ok::<_, Infallible>(handle(req, &chain).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, chain: &Mutex<Chain>) -> Response<Full<Bytes>> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let reply = match serde_json::from_slice::<Value>(&body) {
        Ok(call) => answer(&call, chain),
        Err(_) => {
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "parse error"}})
        }
    };
    Response::new(Full::new(Bytes::from(reply.to_string())))
}

fn hex32(b: &[u8; 32]) -> String {
    crate::model::hex(b)
}

fn answer(call: &Value, chain: &Mutex<Chain>) -> Value {
    let id = call.get("id").cloned().unwrap_or(Value::Null);
    let method = call.get("method").and_then(Value::as_str).unwrap_or("");
    let Ok(c) = chain.lock() else {
        return json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": "internal"}});
    };
    let head = c.blocks.len() as u64 - 1;
    let result = match method {
        "eth_blockNumber" => json!(format!("0x{head:x}")),
        "eth_chainId" => json!("0x7a69"),
        "eth_syncing" => json!(false),
        "net_peerCount" => json!("0x8"),
        "eth_getBlockByNumber" => {
            let arg = call
                .pointer("/params/0")
                .and_then(Value::as_str)
                .unwrap_or("");
            let height = match arg {
                "latest" => Some(head),
                s => s
                    .strip_prefix("0x")
                    .and_then(|h| u64::from_str_radix(h, 16).ok()),
            };
            match height.and_then(|h| c.blocks.get(h as usize).map(|b| (h, b))) {
                Some((h, b)) => json!({
                    "number": format!("0x{h:x}"),
                    "hash": hex32(&b.hash),
                    "parentHash": hex32(&b.parent),
                    "timestamp": format!("0x{:x}", b.timestamp),
                }),
                None => Value::Null,
            }
        }
        _ => {
            return json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "method not found"}})
        }
    };
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorg_replaces_the_top_blocks_and_keeps_linkage() {
        let mut c = Chain::new();
        for _ in 0..10 {
            c.push();
        }
        let before: Vec<[u8; 32]> = c.blocks.iter().map(|b| b.hash).collect();
        c.reorg(3);
        assert_eq!(c.blocks.len(), 11);
        assert_eq!(c.blocks[7].hash, before[7]);
        for (h, old) in before.iter().enumerate().skip(8) {
            assert_ne!(&c.blocks[h].hash, old);
            assert_eq!(c.blocks[h].parent, c.blocks[h - 1].hash);
        }
    }
}
