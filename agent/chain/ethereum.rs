//! Ethereum JSON-RPC (any execution client: geth, nethermind, erigon, reth,
//! besu, anvil).

use std::sync::Arc;

use serde_json::{json, Value};
use sha3::{Digest, Keccak256};

use super::rpc::{parse_quantity, JsonRpcClient};
use super::{at_height, ChainSource, SourceError, SourceFuture, Verification};
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
        at_height(parse_block(&v)?, height)
    }
}

fn hash_field(v: &Value, field: &str) -> Result<Hash, SourceError> {
    v.get(field)
        .and_then(Value::as_str)
        .and_then(Hash::from_hex)
        .filter(|h| h.0.len() == 32)
        .ok_or_else(|| SourceError::Malformed(format!("block.{field} is not a 32-byte hex hash")))
}

/// One `eth_getBlockByNumber` result as a header (its reply kept in `raw`).
pub fn parse_block(v: &Value) -> Result<Header, SourceError> {
    let field = |name: &str| {
        v.get(name)
            .ok_or_else(|| SourceError::Malformed(format!("block lacks {name}")))
    };
    // The header's own fields, without the (possibly long) transaction,
    // uncle and withdrawal lists.
    let raw = match v {
        Value::Object(map) => Some(Arc::new(Value::Object(
            map.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "transactions" | "uncles" | "withdrawals"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ))),
        _ => None,
    };
    Ok(Header {
        height: parse_quantity(field("number")?, "block.number")?,
        hash: hash_field(v, "hash")?,
        parent_hash: hash_field(v, "parentHash")?,
        timestamp: parse_quantity(field("timestamp")?, "block.timestamp")? as i64,
        raw,
    })
}

/// How a header field is encoded in the hashed RLP list.
#[derive(Clone, Copy)]
enum Field {
    /// A byte string of exactly this many bytes.
    Fixed(usize),
    /// A byte string of any length.
    Bytes,
    /// An integer: big-endian, no leading zero bytes.
    Quantity,
}

/// The header fields in RLP order. The first 15 are in every header; each
/// later one came with a fork (London, Shanghai, Cancun, Prague), and a
/// header carries a prefix of them.
const HEADER_FIELDS: [(&str, Field); 21] = [
    ("parentHash", Field::Fixed(32)),
    ("sha3Uncles", Field::Fixed(32)),
    ("miner", Field::Fixed(20)),
    ("stateRoot", Field::Fixed(32)),
    ("transactionsRoot", Field::Fixed(32)),
    ("receiptsRoot", Field::Fixed(32)),
    ("logsBloom", Field::Fixed(256)),
    ("difficulty", Field::Quantity),
    ("number", Field::Quantity),
    ("gasLimit", Field::Quantity),
    ("gasUsed", Field::Quantity),
    ("timestamp", Field::Quantity),
    ("extraData", Field::Bytes),
    ("mixHash", Field::Fixed(32)),
    ("nonce", Field::Fixed(8)),
    // London (EIP-1559)
    ("baseFeePerGas", Field::Quantity),
    // Shanghai (EIP-4895)
    ("withdrawalsRoot", Field::Fixed(32)),
    // Cancun (EIP-4844, EIP-4788)
    ("blobGasUsed", Field::Quantity),
    ("excessBlobGas", Field::Quantity),
    ("parentBeaconBlockRoot", Field::Fixed(32)),
    // Prague (EIP-7685)
    ("requestsHash", Field::Fixed(32)),
];
const ALWAYS_PRESENT: usize = 15;

/// keccak256 of the empty uncle list: every header after the merge has it.
const EMPTY_UNCLES: &str = "0x1dcc4de8dec75d7aab85b567b6ccd41ad312451b948a7413f0a142fd40d49347";

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    let digits = s.strip_prefix("0x")?;
    if digits.is_empty() {
        return Some(Vec::new());
    }
    Hash::from_hex(digits).map(|h| h.0)
}

/// A quantity as its big-endian bytes without leading zeros ("0x0" is empty).
fn quantity_bytes(s: &str) -> Option<Vec<u8>> {
    let digits = s.strip_prefix("0x")?.trim_start_matches('0');
    if digits.is_empty() {
        return Some(Vec::new());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_string()
    };
    Hash::from_hex(&padded).map(|h| h.0)
}

/// The RLP-encoded header: the preimage of the block hash.
pub fn header_rlp(block: &Value) -> Result<Vec<u8>, String> {
    let mut items: Vec<Vec<u8>> = Vec::with_capacity(HEADER_FIELDS.len());
    for (i, (name, kind)) in HEADER_FIELDS.iter().enumerate() {
        let Some(v) = block.get(*name).filter(|v| !v.is_null()) else {
            if i < ALWAYS_PRESENT {
                return Err(format!("block lacks {name}"));
            }
            // Later fields exist only as a prefix: a gap means an unknown layout.
            if let Some((later, _)) = HEADER_FIELDS[i + 1..]
                .iter()
                .find(|(n, _)| block.get(*n).is_some_and(|v| !v.is_null()))
            {
                return Err(format!("block has {later} but lacks {name}"));
            }
            break;
        };
        let s = v
            .as_str()
            .ok_or_else(|| format!("block.{name} is not a hex string"))?;
        let bytes = match kind {
            Field::Quantity => quantity_bytes(s),
            Field::Bytes => hex_bytes(s),
            Field::Fixed(n) => hex_bytes(s).filter(|b| b.len() == *n),
        }
        .ok_or_else(|| format!("block.{name} is not valid hex of the right length: {s}"))?;
        items.push(bytes);
    }
    let mut out = Vec::with_capacity(600);
    alloy_rlp::encode_list::<Vec<u8>, [u8]>(&items, &mut out);
    Ok(out)
}

/// keccak256 of the RLP header: what the block's hash must be.
pub fn computed_hash(block: &Value) -> Result<Hash, String> {
    Ok(Hash(Keccak256::digest(header_rlp(block)?).to_vec()))
}

fn quantity_of(block: &Value, name: &str) -> Option<u128> {
    let s = block.get(name)?.as_str()?.strip_prefix("0x")?;
    u128::from_str_radix(s, 16).ok()
}

/// Bounds that hold for one header on its own (parent-relative rules such as
/// the gas-limit step are not checked).
fn field_problems(block: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let gas_limit = quantity_of(block, "gasLimit");
    let gas_used = quantity_of(block, "gasUsed");
    if let (Some(limit), Some(used)) = (gas_limit, gas_used) {
        if used > limit {
            problems.push(format!("gasUsed {used} exceeds gasLimit {limit}"));
        }
    }
    if let Some(limit) = gas_limit {
        // Yellow Paper: at least 5000, below 2^63.
        if !(5000..1 << 63).contains(&limit) {
            problems.push(format!("gasLimit {limit} outside 5000..2^63"));
        }
    }
    if let Some(extra) = block.get("extraData").and_then(Value::as_str) {
        let len = extra.len().saturating_sub(2) / 2;
        if len > 32 {
            problems.push(format!("extraData is {len} bytes, above the 32-byte limit"));
        }
    }
    if let Some(blob) = quantity_of(block, "blobGasUsed") {
        // EIP-4844: whole blobs of 2^17 gas each.
        if blob % (1 << 17) != 0 {
            problems.push(format!("blobGasUsed {blob} is not a multiple of 131072"));
        }
    }
    if let Some(size) = quantity_of(block, "size") {
        // EIP-7934 caps an RLP block at 10 MiB.
        if size > 10 << 20 {
            problems.push(format!("size {size} bytes above the 10 MiB block cap"));
        }
    }
    // After the merge (every Shanghai-or-later header): no proof of work.
    if block.get("withdrawalsRoot").is_some_and(|v| !v.is_null()) {
        if quantity_of(block, "difficulty").is_some_and(|d| d != 0) {
            problems.push("difficulty is not 0 after the merge".into());
        }
        if quantity_of(block, "nonce").is_some_and(|n| n != 0) {
            problems.push("nonce is not 0 after the merge".into());
        }
        if block
            .get("sha3Uncles")
            .and_then(Value::as_str)
            .is_some_and(|u| !u.eq_ignore_ascii_case(EMPTY_UNCLES))
        {
            problems.push("sha3Uncles is not the empty-list hash after the merge".into());
        }
    }
    problems
}

impl ChainSource for EthereumSource {
    fn chain(&self) -> &'static str {
        "ethereum"
    }

    fn head_subscription(&self) -> Option<Value> {
        Some(json!({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": ["newHeads"]}))
    }

    fn is_head_notice(&self, msg: &Value) -> bool {
        msg["method"] == "eth_subscription"
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

    fn verify(&self, header: &Header) -> Verification {
        let Some(raw) = &header.raw else {
            return Verification::Unreadable("the header's reply was not kept".into());
        };
        match computed_hash(raw) {
            Ok(computed) if computed == header.hash => Verification::Match,
            Ok(computed) => Verification::Mismatch { computed },
            Err(e) => Verification::Unreadable(e),
        }
    }

    fn can_verify(&self) -> bool {
        true
    }

    fn check_fields(&self, header: &Header) -> Vec<String> {
        header
            .raw
            .as_deref()
            .map(field_problems)
            .unwrap_or_default()
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

    fn header_of(block: &Value) -> Header {
        parse_block(block).unwrap()
    }

    fn source() -> EthereumSource {
        EthereumSource::new(JsonRpcClient::new(
            "http://127.0.0.1:1",
            std::time::Duration::from_secs(1),
            1 << 20,
            crate::latency::RpcTimings::new(),
        ))
    }

    fn anvil_block() -> Value {
        serde_json::from_str(include_str!("testdata/anvil-prague-block.json")).unwrap()
    }

    #[test]
    fn an_anvil_block_verifies_and_a_changed_field_does_not() {
        let block = anvil_block();
        assert!(block["transactions"]
            .as_array()
            .is_some_and(|t| !t.is_empty()));
        let s = source();
        let h = header_of(&block);
        assert!(h.raw.as_ref().unwrap().get("transactions").is_none());
        assert_eq!(s.verify(&h), Verification::Match);
        assert!(s.check_fields(&h).is_empty(), "{:?}", s.check_fields(&h));
        for field in [
            "stateRoot",
            "gasUsed",
            "extraData",
            "requestsHash",
            "timestamp",
        ] {
            let mut tampered = block.clone();
            let v = tampered[field].as_str().unwrap().to_string();
            // Change the last hex digit (or give empty extraData one byte).
            let changed = if v == "0x" {
                "0x01".to_string()
            } else {
                let last = v.chars().last().unwrap();
                format!(
                    "{}{}",
                    &v[..v.len() - 1],
                    if last == '1' { '2' } else { '1' }
                )
            };
            tampered[field] = Value::String(changed);
            match s.verify(&header_of(&tampered)) {
                Verification::Mismatch { computed } => assert_ne!(computed, h.hash),
                other => panic!("{field} changed, yet verify said {other:?}"),
            }
        }
    }

    #[test]
    fn real_mainnet_headers_of_every_layout_verify() {
        let blocks: Vec<Value> =
            serde_json::from_str(include_str!("testdata/ethereum-mainnet-headers.json")).unwrap();
        let s = source();
        let mut layouts = Vec::new();
        for block in &blocks {
            let h = header_of(block);
            assert_eq!(s.verify(&h), Verification::Match, "block {}", h.height);
            assert!(
                s.check_fields(&h).is_empty(),
                "block {}: {:?}",
                h.height,
                s.check_fields(&h)
            );
            layouts.push(
                HEADER_FIELDS
                    .iter()
                    .filter(|(n, _)| block.get(*n).is_some())
                    .count(),
            );
            // One changed byte in the parent hash breaks it.
            let mut tampered = block.clone();
            let p = block["parentHash"].as_str().unwrap();
            tampered["parentHash"] = Value::String(format!("{}00", &p[..p.len() - 2]));
            assert!(matches!(
                s.verify(&header_of(&tampered)),
                Verification::Mismatch { .. }
            ));
        }
        // Frontier, London, Shanghai, Cancun, Prague.
        assert_eq!(layouts, [15, 16, 17, 20, 21]);
    }

    #[test]
    fn a_gap_in_the_fork_fields_is_unreadable_not_a_mismatch() {
        let mut block = anvil_block();
        block.as_object_mut().unwrap().remove("withdrawalsRoot");
        match source().verify(&header_of(&block)) {
            Verification::Unreadable(e) => assert!(e.contains("lacks withdrawalsRoot"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fields_out_of_protocol_bounds_are_named() {
        let mut block = anvil_block();
        block["gasUsed"] = json!("0x1c9c381"); // gasLimit + 1
        block["extraData"] = json!(format!("0x{}", "ab".repeat(33)));
        block["blobGasUsed"] = json!("0x1");
        block["difficulty"] = json!("0x2");
        let problems = source().check_fields(&header_of(&block));
        let all = problems.join(" | ");
        assert_eq!(problems.len(), 4, "{all}");
        assert!(
            all.contains("gasUsed 30000001 exceeds gasLimit 30000000"),
            "{all}"
        );
        assert!(all.contains("extraData is 33 bytes"), "{all}");
        assert!(all.contains("blobGasUsed 1 is not a multiple"), "{all}");
        assert!(all.contains("difficulty is not 0 after the merge"), "{all}");
    }
}
