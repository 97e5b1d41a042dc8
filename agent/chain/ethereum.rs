//! Ethereum JSON-RPC (any execution client: geth, nethermind, erigon, reth,
//! besu, anvil).

use serde_json::{json, Value};

use super::rpc::{parse_quantity, JsonRpcClient};
use super::{ChainSource, SourceError, SourceFuture};
use crate::model::{Hash, Header, HeaderRef, NodeStatus};

pub struct EthereumSource {
    rpc: JsonRpcClient,
}

impl EthereumSource {
    pub fn new(rpc: JsonRpcClient) -> Self {
        EthereumSource { rpc }
    }

    async fn block(&self, height: u64) -> Result<Header, SourceError> {
        let v = self
            .rpc
            .call(
                "eth_getBlockByNumber",
                json!([format!("0x{height:x}"), false]),
            )
            .await?;
        if v.is_null() {
            return Err(SourceError::NotFound(height));
        }
        let header = parse_block(&v)?;
        if header.height != height {
            return Err(SourceError::Malformed(format!(
                "asked for block {height}, got block {}",
                header.height
            )));
        }
        Ok(header)
    }
}

fn hash_field(v: &Value, field: &str) -> Result<Hash, SourceError> {
    v.get(field)
        .and_then(Value::as_str)
        .and_then(Hash::from_hex)
        .filter(|h| h.0.len() == 32)
        .ok_or_else(|| SourceError::Malformed(format!("block.{field} is not a 32-byte hex hash")))
}

fn parse_block(v: &Value) -> Result<Header, SourceError> {
    let field = |name: &str| {
        v.get(name)
            .ok_or_else(|| SourceError::Malformed(format!("block lacks {name}")))
    };
    Ok(Header {
        height: parse_quantity(field("number")?, "block.number")?,
        hash: hash_field(v, "hash")?,
        parent_hash: hash_field(v, "parentHash")?,
        timestamp: parse_quantity(field("timestamp")?, "block.timestamp")? as i64,
    })
}

impl ChainSource for EthereumSource {
    fn chain(&self) -> &'static str {
        "ethereum"
    }

    fn head(&self) -> SourceFuture<'_, HeaderRef> {
        Box::pin(async move {
            let n = self.rpc.call("eth_blockNumber", json!([])).await?;
            let height = parse_quantity(&n, "eth_blockNumber")?;
            let h = self.block(height).await?;
            Ok(HeaderRef {
                height: h.height,
                hash: h.hash,
            })
        })
    }

    fn header(&self, height: u64) -> SourceFuture<'_, Header> {
        Box::pin(self.block(height))
    }

    fn network_id(&self) -> SourceFuture<'_, String> {
        Box::pin(async move {
            let v = self.rpc.call("eth_chainId", json!([])).await?;
            Ok(parse_quantity(&v, "eth_chainId")?.to_string())
        })
    }

    fn status(&self) -> SourceFuture<'_, NodeStatus> {
        Box::pin(async move {
            let mut status = NodeStatus::default();
            match self.rpc.call("eth_syncing", json!([])).await {
                Ok(Value::Bool(b)) => status.syncing = Some(b),
                Ok(obj @ Value::Object(_)) => {
                    status.syncing = Some(true);
                    status.sync_highest_block = obj
                        .get("highestBlock")
                        .and_then(|v| parse_quantity(v, "highestBlock").ok());
                }
                Ok(other) => {
                    return Err(SourceError::Malformed(format!(
                        "eth_syncing: unexpected {other}"
                    )))
                }
                Err(e) if e.is_method_not_found() => {}
                Err(e) => return Err(e),
            }
            match self.rpc.call("net_peerCount", json!([])).await {
                Ok(v) => status.peers = Some(parse_quantity(&v, "net_peerCount")?),
                Err(e) if e.is_method_not_found() => {}
                Err(e) => return Err(e),
            }
            Ok(status)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_mainnet_block_header() {
        // Ethereum mainnet block 1 as eth_getBlockByNumber("0x1", false) returns it.
        let v = json!({
            "number": "0x1",
            "hash": "0x88e96d4537bea4d9c05d12549907b32561d3bf31f45aae734cdc119f13406cb6",
            "parentHash": "0xd4e56740f876aef8c010b86a40d5f56745a118d0906a34e69aec8c0db1cb8fa3",
            "timestamp": "0x55ba4224"
        });
        let h = parse_block(&v).unwrap();
        assert_eq!(h.height, 1);
        assert_eq!(h.timestamp, 1438269988);
        assert_eq!(
            h.parent_hash.to_string(),
            "0xd4e56740f876aef8c010b86a40d5f56745a118d0906a34e69aec8c0db1cb8fa3"
        );
    }

    #[test]
    fn rejects_short_hashes_and_missing_fields() {
        let v = json!({"number": "0x1", "hash": "0x88", "parentHash": "0x00", "timestamp": "0x1"});
        assert!(matches!(parse_block(&v), Err(SourceError::Malformed(_))));
        let v = json!({"hash": "0x88"});
        assert!(matches!(parse_block(&v), Err(SourceError::Malformed(_))));
    }
}
