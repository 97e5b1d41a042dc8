//! Algorand's algod REST API: the last round from `/v2/status` (and
//! catch-up as sync state), each block's hash from `/v2/blocks/{round}/hash`
//! and its header (time, the previous block's hash, the genesis id) from
//! `/v2/blocks/{round}`, pending transactions from
//! `/v2/transactions/pending`. The token goes in `X-Algo-API-Token`.
//! Algorand blocks are final once certified.

use data_encoding::BASE32_NOPAD;
use serde_json::Value;

use super::rpc::JsonRpcClient;
use super::{ChainSource, SourceError, SourceFuture};
use crate::model::{Hash, Header, HeaderRef, NodeStatus};

/// algod reads its API token from this header.
pub const TOKEN_HEADER: &str = "X-Algo-API-Token";

pub struct AlgorandSource {
    api: JsonRpcClient,
}

impl AlgorandSource {
    pub fn new(api: JsonRpcClient) -> Self {
        AlgorandSource { api }
    }

    async fn last_round(&self) -> Result<(u64, Value), SourceError> {
        let s = self.api.get("/v2/status").await?;
        let round = s["last-round"]
            .as_u64()
            .ok_or_else(|| SourceError::Malformed("/v2/status lacks last-round".into()))?;
        Ok((round, s))
    }

    async fn block_hash(&self, round: u64) -> Result<Hash, SourceError> {
        let v = match self.api.get(&format!("/v2/blocks/{round}/hash")).await {
            Err(SourceError::Rpc { code: 404, .. }) => return Err(SourceError::NotFound(round)),
            other => other?,
        };
        decode_hash(v["blockHash"].as_str().unwrap_or(""), "blockHash")
    }
}

/// A block hash as algod writes it: base32 without padding, optionally
/// after `blk-`.
pub fn decode_hash(s: &str, what: &str) -> Result<Hash, SourceError> {
    BASE32_NOPAD
        .decode(s.trim_start_matches("blk-").as_bytes())
        .ok()
        .filter(|b| b.len() == 32)
        .map(Hash)
        .ok_or_else(|| {
            SourceError::Malformed(format!("{what} is not a base32 32-byte hash: {s:?}"))
        })
}

impl ChainSource for AlgorandSource {
    fn chain(&self) -> &'static str {
        "algorand"
    }

    fn head(&self) -> SourceFuture<'_, HeaderRef> {
        Box::pin(async move {
            let (round, _) = self.last_round().await?;
            Ok(HeaderRef {
                height: round,
                hash: self.block_hash(round).await?,
            })
        })
    }

    fn header(&self, height: u64) -> SourceFuture<'_, Header> {
        Box::pin(async move {
            let hash = self.block_hash(height).await?;
            let v = self.api.get(&format!("/v2/blocks/{height}")).await?;
            let b = &v["block"];
            // JSON omits zero values: round 0 has no `rnd`, and no `prev`.
            let round = b["rnd"].as_u64().unwrap_or(0);
            if round != height {
                return Err(SourceError::Malformed(format!(
                    "asked for round {height}, got round {round}"
                )));
            }
            let parent_hash = match b["prev"].as_str() {
                Some(p) => decode_hash(p, "block.prev")?,
                None if height == 0 => Hash(vec![0; 32]),
                None => return Err(SourceError::Malformed("block lacks prev".into())),
            };
            Ok(Header {
                height,
                hash,
                parent_hash,
                timestamp: b["ts"].as_i64().unwrap_or(0),
                raw: None,
            })
        })
    }

    fn network_id(&self) -> SourceFuture<'_, String> {
        Box::pin(async move {
            let (round, _) = self.last_round().await?;
            let v = self.api.get(&format!("/v2/blocks/{round}")).await?;
            v["block"]["gen"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| SourceError::Malformed("block lacks gen (the genesis id)".into()))
        })
    }

    fn status(&self) -> SourceFuture<'_, NodeStatus> {
        Box::pin(async move {
            let (_, s) = self.last_round().await?;
            let pending = self.api.get("/v2/transactions/pending?max=0").await?;
            Ok(NodeStatus {
                syncing: s["catchup-time"].as_u64().map(|ns| ns > 0),
                mempool: pending["total-transactions"].as_u64(),
                ..Default::default()
            })
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
    fn block_hashes_decode_with_and_without_the_blk_prefix() {
        let h = decode_hash("VH3GSSKBJYTDF4BBXNWQPTP5DF6QIUE5N54JOI6CCBQYVTJ2DLBA", "x").unwrap();
        assert_eq!(h.0.len(), 32);
        assert_eq!(
            decode_hash(
                "blk-VH3GSSKBJYTDF4BBXNWQPTP5DF6QIUE5N54JOI6CCBQYVTJ2DLBA",
                "x"
            )
            .unwrap(),
            h
        );
        assert!(decode_hash("blk-NOTBASE32!", "x").is_err());
        assert!(decode_hash("MFRGG", "x").is_err(), "too short");
    }
}
