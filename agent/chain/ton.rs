//! TON through the HTTP API operators run beside their node (toncenter's
//! v2 API, also served by ton-http-api): the masterchain's last block from
//! `getMasterchainInfo`, each block's header (its root hash, time and the
//! previous block's root hash) from `getBlockHeader`. The network id is the
//! header's `global_id` (-239 on mainnet, -3 on testnet). Masterchain
//! blocks are final, so a replaced one is a critical finding.

use base64::Engine;
use serde_json::Value;

use super::rpc::JsonRpcClient;
use super::{at_height, ChainSource, SourceError, SourceFuture};
use crate::model::{Hash, Header, HeaderRef, NodeStatus};

/// The masterchain: workchain -1, the full shard.
const MASTERCHAIN: &str = "workchain=-1&shard=-9223372036854775808";

/// The HTTP API reads its key from this header.
pub const KEY_HEADER: &str = "X-API-Key";

pub struct TonSource {
    api: JsonRpcClient,
}

impl TonSource {
    pub fn new(api: JsonRpcClient) -> Self {
        TonSource { api }
    }

    /// The `result` of an `{"ok": true, "result": ...}` reply.
    async fn call(&self, path: &str) -> Result<Value, SourceError> {
        // A block the API does not have comes back as HTTP 404 or 500 with
        // {"ok": false, "error": ...}, which `get` turns into an RPC error.
        let v = self.api.get(path).await?;
        if v["ok"] != true {
            return Err(SourceError::Rpc {
                code: v["code"].as_i64().unwrap_or(0),
                message: v["error"]
                    .as_str()
                    .unwrap_or("ok is not true")
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        Ok(v["result"].clone())
    }

    async fn block_header(&self, seqno: u64) -> Result<Value, SourceError> {
        self.call(&format!("/getBlockHeader?{MASTERCHAIN}&seqno={seqno}"))
            .await
    }
}

fn root_hash(v: &Value, what: &str) -> Result<Hash, SourceError> {
    v["root_hash"]
        .as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .filter(|b| b.len() == 32)
        .map(Hash)
        .ok_or_else(|| {
            SourceError::Malformed(format!("{what}.root_hash is not a base64 32-byte hash"))
        })
}

/// One `getBlockHeader` result as a header.
pub fn parse_header(v: &Value) -> Result<Header, SourceError> {
    let seqno = v["id"]["seqno"]
        .as_u64()
        .ok_or_else(|| SourceError::Malformed("blocks.header lacks id.seqno".into()))?;
    let prev = v["prev_blocks"]
        .as_array()
        .and_then(|p| p.first())
        .ok_or_else(|| SourceError::Malformed("blocks.header lacks prev_blocks".into()))?;
    if prev["seqno"].as_u64() != seqno.checked_sub(1) {
        return Err(SourceError::Malformed(format!(
            "block {seqno}: prev_blocks[0] is seqno {}, not {}",
            prev["seqno"],
            seqno.saturating_sub(1)
        )));
    }
    Ok(Header {
        height: seqno,
        hash: root_hash(&v["id"], "id")?,
        parent_hash: root_hash(prev, "prev_blocks[0]")?,
        timestamp: v["gen_utime"]
            .as_i64()
            .ok_or_else(|| SourceError::Malformed("blocks.header lacks gen_utime".into()))?,
        raw: None,
    })
}

impl ChainSource for TonSource {
    fn chain(&self) -> &'static str {
        "ton"
    }

    fn head(&self) -> SourceFuture<'_, HeaderRef> {
        Box::pin(async move {
            let info = self.call("/getMasterchainInfo").await?;
            let last = &info["last"];
            Ok(HeaderRef {
                height: last["seqno"].as_u64().ok_or_else(|| {
                    SourceError::Malformed("getMasterchainInfo lacks last.seqno".into())
                })?,
                hash: root_hash(last, "last")?,
            })
        })
    }

    fn header(&self, height: u64) -> SourceFuture<'_, Header> {
        Box::pin(async move { at_height(parse_header(&self.block_header(height).await?)?, height) })
    }

    fn network_id(&self) -> SourceFuture<'_, String> {
        Box::pin(async move {
            let head = self.head().await?;
            let v = self.block_header(head.height).await?;
            v["global_id"]
                .as_i64()
                .map(|g| g.to_string())
                .ok_or_else(|| SourceError::Malformed("blocks.header lacks global_id".into()))
        })
    }

    fn status(&self) -> SourceFuture<'_, NodeStatus> {
        // The HTTP API says nothing of peers, sync or a mempool.
        Box::pin(async move { Ok(NodeStatus::default()) })
    }

    /// Masterchain blocks are final once the validators commit them.
    fn final_on_commit(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_masterchain_header_in_the_http_api_shape() {
        let v = json!({
            "@type": "blocks.header",
            "id": {"@type": "ton.blockIdExt", "workchain": -1, "shard": "-9223372036854775808",
                   "seqno": 34000001, "root_hash": "x3Jn7wLfVz6o7SvdCBhAwkPrUVUg7cELr9Bmfu2Q3pQ=",
                   "file_hash": "Fz0q2zqXbPBtuQfbmwN1sSxJBv9g8X0mFpAiYTJjQAw="},
            "global_id": -239, "version": 0, "after_merge": false, "after_split": false,
            "before_split": false, "want_merge": true, "want_split": false,
            "validator_list_hash_short": 1123581321, "catchain_seqno": 556, "min_ref_mc_seqno": 34000000,
            "is_key_block": false, "prev_key_block_seqno": 33990000,
            "start_lt": "44000000000000", "end_lt": "44000000000004", "gen_utime": 1700000000,
            "prev_blocks": [{"@type": "ton.blockIdExt", "workchain": -1, "shard": "-9223372036854775808",
                             "seqno": 34000000, "root_hash": "n2Qp0fTnKyhhJwEnDi0xY8WBv6aKNbxoX9eP2XGKkwE=",
                             "file_hash": "bAWS2i2ZQ9s8hXa3cJh84YwSuJYXaxVqAXJyKM5NdvE="}]
        });
        let h = parse_header(&v).unwrap();
        assert_eq!((h.height, h.timestamp), (34000001, 1700000000));
        assert_eq!(h.hash.0.len(), 32);
        assert_eq!(h.parent_hash.0[0], 0x9f);
        let mut wrong = v.clone();
        wrong["prev_blocks"][0]["seqno"] = json!(33999999);
        assert!(matches!(
            parse_header(&wrong),
            Err(SourceError::Malformed(_))
        ));
    }
}
