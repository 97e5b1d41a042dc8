//! Bitcoin Core JSON-RPC (and forks that keep its RPC): heads from
//! `getblockchaininfo`, headers as the raw 80 bytes from `getblockheader`,
//! peers from `getconnectioncount`, the mempool from `getmempoolinfo`,
//! branches competing with the active chain from `getchaintips`.
//! Level `full` recomputes each header's double SHA-256 and checks its proof
//! of work against its `bits`.

use ring::digest::{digest, SHA256};
use serde_json::{json, Value};

use super::rpc::JsonRpcClient;
use super::{ChainSource, SourceError, SourceFuture, Verification};
use crate::model::{CompetingTip, Hash, Header, HeaderRef, NodeStatus};

/// A branch whose tip is at most this many blocks below the active tip
/// still competes with it; older stale tips stay in `getchaintips` for
/// good and are history, not news.
pub const COMPETING_WINDOW: u64 = 2;

/// The branches in a `getchaintips` reply that compete with the active
/// chain: valid (or not yet fully checked) tips within `COMPETING_WINDOW`
/// of the active tip, highest first. Invalid branches are not candidates.
pub fn competing_tips(v: &Value) -> Result<Vec<CompetingTip>, SourceError> {
    let tips = v.as_array().ok_or_else(|| {
        SourceError::Malformed(format!("getchaintips: expected an array, got {v}"))
    })?;
    let field = |t: &Value, name: &str| {
        t[name]
            .as_u64()
            .ok_or_else(|| SourceError::Malformed(format!("getchaintips: a tip lacks {name}")))
    };
    let mut active = None;
    let mut out = Vec::new();
    for t in tips {
        let status = t["status"]
            .as_str()
            .ok_or_else(|| SourceError::Malformed("getchaintips: a tip lacks status".into()))?;
        let height = field(t, "height")?;
        if status == "active" {
            active = Some(height);
            continue;
        }
        if !matches!(status, "valid-fork" | "valid-headers" | "headers-only") {
            continue;
        }
        out.push(CompetingTip {
            height,
            hash: t["hash"]
                .as_str()
                .and_then(Hash::from_hex)
                .filter(|h| h.0.len() == 32)
                .ok_or_else(|| {
                    SourceError::Malformed(
                        "getchaintips: a tip's hash is not 32 bytes of hex".into(),
                    )
                })?,
            branch_len: field(t, "branchlen")?,
            status: status.to_string(),
        });
    }
    let active =
        active.ok_or_else(|| SourceError::Malformed("getchaintips: no tip is active".into()))?;
    out.retain(|t| t.height + COMPETING_WINDOW >= active);
    out.sort_by_key(|t| std::cmp::Reverse(t.height));
    Ok(out)
}

pub struct BitcoinSource {
    rpc: JsonRpcClient,
}

impl BitcoinSource {
    pub fn new(rpc: JsonRpcClient) -> Self {
        BitcoinSource { rpc }
    }

    async fn chain_info(&self) -> Result<Value, SourceError> {
        let v = self.rpc.call("getblockchaininfo", json!([])).await?;
        if !v.is_object() {
            return Err(SourceError::Malformed(format!(
                "getblockchaininfo: expected an object, got {v}"
            )));
        }
        Ok(v)
    }
}

/// The fields of an 80-byte block header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHeader {
    pub bytes: [u8; 80],
}

impl RawHeader {
    pub fn from_hex(s: &str) -> Option<RawHeader> {
        let b = Hash::from_hex(s)?.0;
        Some(RawHeader {
            bytes: b.try_into().ok()?,
        })
    }

    /// The block hash in display order (as RPC and explorers show it).
    pub fn hash(&self) -> Hash {
        let once = digest(&SHA256, &self.bytes);
        let mut twice = digest(&SHA256, once.as_ref()).as_ref().to_vec();
        twice.reverse();
        Hash(twice)
    }

    /// The previous block's hash in display order.
    pub fn prev_hash(&self) -> Hash {
        let mut prev = self.bytes[4..36].to_vec();
        prev.reverse();
        Hash(prev)
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ])
    }

    pub fn time(&self) -> u32 {
        self.u32_at(68)
    }

    pub fn bits(&self) -> u32 {
        self.u32_at(72)
    }
}

/// The 256-bit target `bits` encodes, big-endian; None for a negative or
/// overflowing encoding.
pub fn target(bits: u32) -> Option<[u8; 32]> {
    let exponent = (bits >> 24) as usize;
    let mantissa = bits & 0x007f_ffff;
    if bits & 0x0080_0000 != 0 && mantissa != 0 {
        return None;
    }
    let mut t = [0u8; 32];
    let m = mantissa.to_be_bytes(); // m[0] is 0; m[1..4] are the mantissa
    for (i, byte) in m[1..4].iter().enumerate() {
        // Byte i of the mantissa sits at 256^(exponent - 1 - i).
        let power = exponent as isize - 1 - i as isize;
        if power < 0 {
            continue;
        }
        if power >= 32 {
            if *byte != 0 {
                return None;
            }
            continue;
        }
        t[31 - power as usize] = *byte;
    }
    Some(t)
}

impl ChainSource for BitcoinSource {
    fn chain(&self) -> &'static str {
        "bitcoin"
    }

    fn head(&self) -> SourceFuture<'_, HeaderRef> {
        Box::pin(async move {
            let info = self.chain_info().await?;
            let height = info["blocks"]
                .as_u64()
                .ok_or_else(|| SourceError::Malformed("getblockchaininfo lacks blocks".into()))?;
            let hash = info["bestblockhash"]
                .as_str()
                .and_then(Hash::from_hex)
                .filter(|h| h.0.len() == 32)
                .ok_or_else(|| {
                    SourceError::Malformed("getblockchaininfo.bestblockhash is not a hash".into())
                })?;
            Ok(HeaderRef { height, hash })
        })
    }

    fn header(&self, height: u64) -> SourceFuture<'_, Header> {
        Box::pin(async move {
            let hash = match self.rpc.call("getblockhash", json!([height])).await {
                // -8: "Block height out of range".
                Err(SourceError::Rpc { code: -8, .. }) => {
                    return Err(SourceError::NotFound(height))
                }
                other => other?,
            };
            let hash_hex = hash
                .as_str()
                .ok_or_else(|| SourceError::Malformed(format!("getblockhash: {hash}")))?
                .to_string();
            let served = Hash::from_hex(&hash_hex)
                .filter(|h| h.0.len() == 32)
                .ok_or_else(|| SourceError::Malformed(format!("getblockhash: {hash_hex:?}")))?;
            let raw = self
                .rpc
                .call("getblockheader", json!([hash_hex, false]))
                .await?;
            let raw_hex = raw.as_str().unwrap_or_default().to_string();
            let header = RawHeader::from_hex(&raw_hex).ok_or_else(|| {
                SourceError::Malformed(format!(
                    "getblockheader {hash_hex}: not an 80-byte header in hex"
                ))
            })?;
            Ok(Header {
                height,
                hash: served,
                parent_hash: header.prev_hash(),
                timestamp: i64::from(header.time()),
                raw: Some(std::sync::Arc::new(json!({ "hex": raw_hex }))),
            })
        })
    }

    fn network_id(&self) -> SourceFuture<'_, String> {
        Box::pin(async move {
            let info = self.chain_info().await?;
            info["chain"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| SourceError::Malformed("getblockchaininfo lacks chain".into()))
        })
    }

    fn status(&self) -> SourceFuture<'_, NodeStatus> {
        Box::pin(async move {
            let info = self.chain_info().await?;
            let mut status = NodeStatus {
                syncing: info["initialblockdownload"].as_bool(),
                sync_highest_block: info["headers"].as_u64(),
                ..Default::default()
            };
            match self.rpc.call("getconnectioncount", json!([])).await {
                Ok(v) => status.peers = v.as_u64(),
                Err(e) if e.is_method_not_found() => {}
                Err(e) => return Err(e),
            }
            match self.rpc.call("getmempoolinfo", json!([])).await {
                Ok(v) => status.mempool = v["size"].as_u64(),
                Err(e) if e.is_method_not_found() => {}
                Err(e) => return Err(e),
            }
            match self.rpc.call("getchaintips", json!([])).await {
                Ok(v) => status.competing_tips = competing_tips(&v)?,
                Err(e) if e.is_method_not_found() => {}
                Err(e) => return Err(e),
            }
            Ok(status)
        })
    }

    fn can_verify(&self) -> bool {
        true
    }

    fn verify(&self, header: &Header) -> Verification {
        let Some(raw) = header
            .raw
            .as_ref()
            .and_then(|r| r["hex"].as_str())
            .and_then(RawHeader::from_hex)
        else {
            return Verification::Unreadable("the raw header was not kept".into());
        };
        let computed = raw.hash();
        if computed != header.hash {
            return Verification::Mismatch { computed };
        }
        match target(raw.bits()) {
            None => {
                Verification::Invalid(format!("bits {:08x} encode no valid target", raw.bits()))
            }
            // Big-endian byte strings of equal length compare as numbers.
            Some(t) if computed.0.as_slice() > t.as_slice() => Verification::Invalid(format!(
                "proof of work fails: hash {computed} is above the target of bits {:08x}",
                raw.bits()
            )),
            Some(_) => Verification::Match,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_tips_near_the_head_compete_and_old_or_invalid_ones_do_not() {
        let h = |c: char| c.to_string().repeat(64);
        // The shape of Bitcoin Core's getchaintips reply.
        let v = json!([
            {"height": 840_002, "hash": h('a'), "branchlen": 0, "status": "active"},
            {"height": 840_002, "hash": h('b'), "branchlen": 1, "status": "valid-headers"},
            {"height": 840_000, "hash": h('c'), "branchlen": 2, "status": "valid-fork"},
            {"height": 839_999, "hash": h('d'), "branchlen": 1, "status": "valid-fork"},
            {"height": 840_003, "hash": h('e'), "branchlen": 2, "status": "invalid"},
        ]);
        let tips = competing_tips(&v).unwrap();
        let heights: Vec<_> = tips.iter().map(|t| (t.height, t.status.as_str())).collect();
        assert_eq!(
            heights,
            [(840_002, "valid-headers"), (840_000, "valid-fork")]
        );
        assert_eq!(tips[0].hash, Hash::from_hex(&h('b')).unwrap());
        assert_eq!(tips[1].branch_len, 2);
        let only_active =
            json!([{"height": 5, "hash": h('a'), "branchlen": 0, "status": "active"}]);
        assert_eq!(competing_tips(&only_active).unwrap(), []);
        for bad in [
            json!({}),
            json!([{"height": 5, "hash": h('a'), "branchlen": 0, "status": "valid-fork"}]),
            json!([{"height": 5, "branchlen": 0, "status": "active"},
                   {"height": 5, "hash": "zz", "branchlen": 1, "status": "valid-fork"}]),
        ] {
            assert!(competing_tips(&bad).is_err(), "{bad}");
        }
    }

    const GENESIS: &str = "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4a29ab5f49ffff001d1dac2b7c";

    #[test]
    fn the_genesis_header_hashes_to_the_genesis_hash_and_meets_its_target() {
        let h = RawHeader::from_hex(GENESIS).unwrap();
        assert_eq!(
            h.hash().to_string(),
            "0x000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f"
        );
        assert_eq!(h.bits(), 0x1d00ffff);
        assert_eq!(h.time(), 1231006505);
        let t = target(h.bits()).unwrap();
        // 0x00000000ffff0000...: the difficulty-1 target.
        assert_eq!(&t[..6], &[0, 0, 0, 0, 0xff, 0xff]);
        assert!(t[6..].iter().all(|b| *b == 0));
        assert!(h.hash().0.as_slice() <= t.as_slice());
    }

    #[test]
    fn targets_decode_like_bitcoin_core() {
        // From Bitcoin Core's arith_uint256 tests (SetCompact).
        assert_eq!(target(0x01003456).unwrap(), [0u8; 32]);
        let t = target(0x05009234).unwrap();
        assert_eq!(&t[27..], &[0x00, 0x92, 0x34, 0x00, 0x00]);
        let t = target(0x04923456);
        assert!(t.is_none(), "negative");
        let t = target(0x20123456).unwrap();
        assert_eq!(&t[..3], &[0x12, 0x34, 0x56]);
        assert!(target(0xff123456).is_none(), "overflow");
    }

    fn source() -> BitcoinSource {
        BitcoinSource::new(JsonRpcClient::new(
            "http://127.0.0.1:1",
            std::time::Duration::from_secs(1),
            1 << 20,
            crate::latency::RpcTimings::new(),
        ))
    }

    fn header_of(height: u64, raw: &RawHeader, served: Hash) -> Header {
        Header {
            height,
            hash: served,
            parent_hash: raw.prev_hash(),
            timestamp: i64::from(raw.time()),
            raw: Some(std::sync::Arc::new(json!({ "hex": hex(&raw.bytes) }))),
        }
    }

    fn hex(b: &[u8]) -> String {
        crate::model::hex(b)[2..].to_string()
    }

    #[test]
    fn mainnet_headers_0_to_2016_link_and_verify_and_tampering_is_caught() {
        let lines = include_str!("../../tests/fixtures/bitcoin/headers-0-2016.hex");
        let headers: Vec<RawHeader> = lines
            .lines()
            .map(|l| RawHeader::from_hex(l).unwrap())
            .collect();
        assert_eq!(headers.len(), 2017);
        let s = source();
        for (h, raw) in headers.iter().enumerate() {
            assert_eq!(
                s.verify(&header_of(h as u64, raw, raw.hash())),
                Verification::Match,
                "block {h}"
            );
            if h > 0 {
                assert_eq!(
                    raw.prev_hash(),
                    headers[h - 1].hash(),
                    "block {h} links to {}",
                    h - 1
                );
            }
        }
        assert_eq!(
            headers[2016].hash().to_string(),
            "0x00000000a141216a896c54f211301c436e557a8d55900637bbdce14c6c7bddef"
        );
        // One flipped bit: the served hash no longer matches.
        let mut flipped = headers[1000].clone();
        flipped.bytes[40] ^= 0x08;
        assert!(matches!(
            s.verify(&header_of(1000, &flipped, headers[1000].hash())),
            Verification::Mismatch { .. }
        ));
        // Its own hash served, but a target 256² times harder that it misses.
        let mut harder = headers[1000].clone();
        harder.bytes[72..76].copy_from_slice(&0x1b00ffffu32.to_le_bytes());
        match s.verify(&header_of(1000, &harder, harder.hash())) {
            Verification::Invalid(e) => assert!(e.contains("proof of work fails"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
