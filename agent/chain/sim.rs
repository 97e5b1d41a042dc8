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
    /// Like `Steady`, but every `every` blocks it follows a side branch for
    /// `depth` blocks, then reorganises back onto the canonical chain.
    Reorg { every: u64, depth: u64 },
    /// Produces blocks `factor` times slower than the others.
    Lag { factor: u32 },
}

impl std::fmt::Display for Behaviour {
    /// What the chain does, in the words the demo prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Behaviour::Steady => write!(f, "a steady chain"),
            Behaviour::Reorg { every, depth } => write!(
                f,
                "a chain that follows a side branch {depth} blocks deep every {every} blocks"
            ),
            Behaviour::Lag { factor } => {
                write!(f, "a chain {factor} times slower than the others")
            }
        }
    }
}

const GENESIS_TIME: u64 = 1_700_000_000;

struct Block {
    hash: [u8; 32],
    parent: [u8; 32],
    timestamp: u64,
}

struct Chain {
    blocks: Vec<Block>,
    /// Blocks at the top that belong to a side branch.
    side: u64,
}

impl Chain {
    fn new() -> Chain {
        let mut c = Chain {
            blocks: Vec::new(),
            side: 0,
        };
        c.push(0);
        c
    }

    /// Block contents depend only on the parent, the height and the branch,
    /// so simulated nodes on the canonical branch (0) agree on every hash.
    fn push(&mut self, branch: u64) {
        let height = self.blocks.len() as u64;
        let parent = self.blocks.last().map(|b| b.hash).unwrap_or([0; 32]);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&parent);
        ctx.update(&height.to_be_bytes());
        ctx.update(&branch.to_be_bytes());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(ctx.finish().as_ref());
        self.blocks.push(Block {
            hash,
            parent,
            timestamp: GENESIS_TIME + height * 12,
        });
    }

    /// One block time: extend the canonical chain, or the side branch, or
    /// leave the side branch for the canonical chain (a reorg).
    fn tick(&mut self, behaviour: Behaviour) {
        let next = self.blocks.len() as u64;
        match behaviour {
            Behaviour::Reorg { depth, .. } if self.side > 0 && self.side < depth => {
                self.side += 1;
                self.push(1);
            }
            Behaviour::Reorg { .. } if self.side > 0 => {
                let keep = self.blocks.len() - self.side as usize;
                self.blocks.truncate(keep);
                for _ in 0..=self.side {
                    self.push(0);
                }
                self.side = 0;
            }
            Behaviour::Reorg { every, .. } if every > 0 && next % every == 0 => {
                self.side = 1;
                self.push(1);
            }
            _ => self.push(0),
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
        c.tick(behaviour);
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
    fn a_side_branch_is_left_for_the_canonical_chain() {
        let behaviour = Behaviour::Reorg { every: 5, depth: 2 };
        let mut steady = Chain::new();
        let mut reorging = Chain::new();
        let mut diverged = 0;
        // 19 ticks end just after the third reorg (side branches start at
        // heights 5, 10 and 15 and last two blocks each).
        for _ in 0..19 {
            steady.tick(Behaviour::Steady);
            reorging.tick(behaviour);
            let top = reorging.blocks.len() - 1;
            if reorging.blocks[top].hash != steady.blocks[top].hash {
                diverged += 1;
            }
            for h in 1..reorging.blocks.len() {
                assert_eq!(reorging.blocks[h].parent, reorging.blocks[h - 1].hash);
            }
        }
        assert!(
            diverged >= 4,
            "it spent time on side branches ({diverged} ticks)"
        );
        assert_eq!(reorging.side, 0);
        assert_eq!(reorging.blocks.len(), steady.blocks.len());
        assert_eq!(
            reorging.blocks.last().map(|b| b.hash),
            steady.blocks.last().map(|b| b.hash)
        );
    }
}
