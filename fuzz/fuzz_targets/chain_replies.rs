//! Every chain's reply decoders on one JSON value: Ethereum blocks (and the
//! hash recomputed from them at level full), CometBFT blocks, TON headers,
//! Bitcoin chain tips and raw headers, Algorand hashes, JSON-RPC
//! quantities, and the WebSocket head notices.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outpost::chain::rpc::{parse_quantity, JsonRpcClient};
use outpost::chain::{bitcoin, cometbft, ethereum, ton, ChainSource};
use outpost::latency::RpcTimings;

fn client() -> JsonRpcClient {
    // Never called: the decoders are what is fuzzed.
    JsonRpcClient::new("http://127.0.0.1:9", Duration::from_secs(1), 1 << 20, RpcTimings::new())
}

/// Made once: an HTTP client reads the system's root certificates.
fn sources() -> &'static (ethereum::EthereumSource, cometbft::CometBftSource) {
    static SOURCES: OnceLock<(ethereum::EthereumSource, cometbft::CometBftSource)> =
        OnceLock::new();
    SOURCES.get_or_init(|| {
        (
            ethereum::EthereumSource::new(client()),
            cometbft::CometBftSource::new(client()),
        )
    })
}

fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Some(raw) = bitcoin::RawHeader::from_hex(text.trim()) {
            let _ = (raw.hash(), raw.prev_hash(), bitcoin::target(raw.bits()));
        }
        let _ = outpost::chain::algorand::decode_hash(text, "fuzz");
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    let (eth, comet) = sources();
    if let Ok(h) = ethereum::parse_block(&v) {
        let _ = eth.verify(&h);
        let _ = eth.check_fields(&h);
    }
    let _ = cometbft::parse_block(&v);
    let _ = ton::parse_header(&v);
    let _ = bitcoin::competing_tips(&v);
    let _ = parse_quantity(&v, "fuzz");
    let _ = eth.is_head_notice(&v);
    let _ = comet.is_head_notice(&v);
});
