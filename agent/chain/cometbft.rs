//! CometBFT RPC (Cosmos chains), over its JSON-RPC endpoint: `status` for
//! the head and sync state, `block` for each header and its link to the
//! previous block, `net_info` for peers, `num_unconfirmed_txs` for the
//! mempool. CometBFT blocks are final once committed, so a changed hash at a
//! stored height is a critical finding, not an ordinary reorg.

use serde_json::{json, Value};

use super::rpc::JsonRpcClient;
use super::{at_height, ChainSource, SourceError, SourceFuture};
use crate::model::{Hash, Header, HeaderRef, NodeStatus};

pub struct CometBftSource {
    rpc: JsonRpcClient,
}

impl CometBftSource {
    pub fn new(rpc: JsonRpcClient) -> Self {
        CometBftSource { rpc }
    }

    async fn status_reply(&self) -> Result<Value, SourceError> {
        let v = self.rpc.call("status", json!({})).await?;
        if !v["sync_info"].is_object() {
            return Err(SourceError::Malformed("status lacks sync_info".into()));
        }
        Ok(v)
    }
}

/// CometBFT numbers are decimal strings.
fn number(v: &Value, what: &str) -> Result<u64, SourceError> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .ok_or_else(|| {
            SourceError::Malformed(format!("{what}: expected a decimal string, got {v}"))
        })
}

fn hash(v: &Value, what: &str) -> Result<Hash, SourceError> {
    v.as_str()
        .and_then(Hash::from_hex)
        .filter(|h| h.0.len() == 32)
        .ok_or_else(|| SourceError::Malformed(format!("{what} is not a 32-byte hex hash")))
}

/// Parses one `block` result into a header.
pub fn parse_block(v: &Value) -> Result<Header, SourceError> {
    let header = &v["block"]["header"];
    let time = header["time"]
        .as_str()
        .ok_or_else(|| SourceError::Malformed("block.header lacks time".into()))?;
    let timestamp = humantime::parse_rfc3339(time)
        .map_err(|e| SourceError::Malformed(format!("block.header.time {time:?}: {e}")))?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let height = number(&header["height"], "block.header.height")?;
    // The first block has an empty last_block_id.
    let parent_hash = match header["last_block_id"]["hash"].as_str() {
        Some("") | None if height <= 1 => Hash(vec![0; 32]),
        _ => hash(
            &header["last_block_id"]["hash"],
            "block.header.last_block_id.hash",
        )?,
    };
    Ok(Header {
        height,
        hash: hash(&v["block_id"]["hash"], "block_id.hash")?,
        parent_hash,
        timestamp,
        raw: None,
    })
}

impl ChainSource for CometBftSource {
    fn chain(&self) -> &'static str {
        "cometbft"
    }

    /// CometBFT's `/websocket` endpoint: `ws://host:26657/websocket`.
    fn head_subscription(&self) -> Option<Value> {
        Some(json!({"jsonrpc": "2.0", "id": 1, "method": "subscribe",
            "params": {"query": "tm.event='NewBlock'"}}))
    }

    fn is_head_notice(&self, msg: &Value) -> bool {
        msg["result"]["data"]["type"] == "tendermint/event/NewBlock"
    }

    fn head(&self) -> SourceFuture<'_, HeaderRef> {
        Box::pin(async move {
            let s = self.status_reply().await?;
            let sync = &s["sync_info"];
            Ok(HeaderRef {
                height: number(
                    &sync["latest_block_height"],
                    "status.sync_info.latest_block_height",
                )?,
                hash: hash(
                    &sync["latest_block_hash"],
                    "status.sync_info.latest_block_hash",
                )?,
            })
        })
    }

    fn header(&self, height: u64) -> SourceFuture<'_, Header> {
        Box::pin(async move {
            let v = match self
                .rpc
                .call("block", json!({ "height": height.to_string() }))
                .await
            {
                // -32603 with "must be less than or equal to the current blockchain height".
                Err(SourceError::Rpc {
                    code: -32603,
                    message,
                }) if message.contains("height") => return Err(SourceError::NotFound(height)),
                other => other?,
            };
            at_height(parse_block(&v)?, height)
        })
    }

    fn network_id(&self) -> SourceFuture<'_, String> {
        Box::pin(async move {
            let s = self.status_reply().await?;
            s["node_info"]["network"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| SourceError::Malformed("status lacks node_info.network".into()))
        })
    }

    fn status(&self) -> SourceFuture<'_, NodeStatus> {
        Box::pin(async move {
            let s = self.status_reply().await?;
            let mut status = NodeStatus {
                syncing: s["sync_info"]["catching_up"].as_bool(),
                ..Default::default()
            };
            let net = self.rpc.call("net_info", json!({})).await?;
            status.peers = Some(number(&net["n_peers"], "net_info.n_peers")?);
            match self.rpc.call("num_unconfirmed_txs", json!({})).await {
                Ok(v) => status.mempool = Some(number(&v["total"], "num_unconfirmed_txs.total")?),
                Err(e) if e.is_method_not_found() => {}
                Err(e) => return Err(e),
            }
            Ok(status)
        })
    }

    fn final_on_commit(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_block_as_the_cometbft_docs_show_it() {
        // The shape of CometBFT's /block reply (docs.cometbft.com, RPC "block").
        let v = json!({
            "block_id": {
                "hash": "112BC173FD838FB68EB43476816CD7B4C6661B6884A9E357B417EE957E1CF8F7",
                "parts": {"total": 1, "hash": "38D4B26B5B725C4F13571EFE022C030390E4C33C8CF6F88EDD8A7ADE2D8A4C8A"}
            },
            "block": {
                "header": {
                    "version": {"block": "11", "app": "0"},
                    "chain_id": "cosmoshub-4",
                    "height": "12",
                    "time": "2019-04-22T17:01:51.701356223Z",
                    "last_block_id": {
                        "hash": "112BC173FD838FB68EB43476816CD7B4C6661B6884A9E357B417EE957E1CF8F8",
                        "parts": {"total": 1, "hash": "38D4B26B5B725C4F13571EFE022C030390E4C33C8CF6F88EDD8A7ADE2D8A4C8A"}
                    }
                },
                "data": {"txs": []}
            }
        });
        let h = parse_block(&v).unwrap();
        assert_eq!(h.height, 12);
        assert_eq!(h.timestamp, 1555952511);
        assert_eq!(h.hash.0[0], 0x11);
        assert_eq!(h.parent_hash.0[31], 0xF8);
        let mut bad = v.clone();
        bad["block"]["header"]["height"] = json!("twelve");
        assert!(matches!(parse_block(&bad), Err(SourceError::Malformed(_))));
    }
}
