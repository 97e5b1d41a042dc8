//! What each fuzz target (`fuzz/fuzz_targets/`) runs on one input, so that
//! the targets and the test that replays their seeds (`tests/it/fuzz_seeds.rs`)
//! run the same code. Every function takes any bytes and must neither panic
//! nor take unbounded memory or time; the results are thrown away.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use prost::Message;

use crate::chain::rpc::{parse_quantity, JsonRpcClient};
use crate::chain::{bitcoin, cometbft, ethereum, ton, ChainSource};
use crate::latency::RpcTimings;
use crate::proto::{agent_message::Body, AgentMessage};

/// What one target runs on one input.
pub type Target = fn(&[u8]);

/// The targets, by name, as `cargo fuzz list` shows them.
pub const TARGETS: [(&str, Target); 5] = [
    ("agent_message", agent_message),
    ("chain_replies", chain_replies),
    ("config", config),
    ("prometheus_scrape", prometheus_scrape),
    ("snapshot", snapshot),
];

/// What the aggregator does with a message off the delivery stream before
/// it stores anything: count its nested messages on the wire, decode it
/// only within the limit, and check a batch.
pub fn agent_message(bytes: &[u8]) {
    let Ok(n) = crate::wire::agent_message_elements(bytes) else {
        return;
    };
    if n > crate::wire::MAX_AGENT_MESSAGE_ELEMENTS {
        return;
    }
    if let Ok(AgentMessage {
        body: Some(Body::Batch(batch)),
    }) = AgentMessage::decode(bytes)
    {
        let _ = crate::aggregator::ingest::check_batch(&batch);
    }
}

/// Made once: an HTTP client reads the system's root certificates. Never
/// called: the decoders are what is fuzzed.
fn sources() -> &'static (ethereum::EthereumSource, cometbft::CometBftSource) {
    static SOURCES: OnceLock<(ethereum::EthereumSource, cometbft::CometBftSource)> =
        OnceLock::new();
    SOURCES.get_or_init(|| {
        let client = || {
            JsonRpcClient::new(
                "http://127.0.0.1:9",
                Duration::from_secs(1),
                1 << 20,
                RpcTimings::new(),
            )
        };
        (
            ethereum::EthereumSource::new(client()),
            cometbft::CometBftSource::new(client()),
        )
    })
}

/// Every chain's reply decoders on one JSON value: Ethereum blocks (and the
/// hash recomputed from them at level full), CometBFT blocks, TON headers,
/// Bitcoin chain tips and raw headers, Algorand hashes, JSON-RPC
/// quantities, and the WebSocket head notices.
pub fn chain_replies(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Some(raw) = bitcoin::RawHeader::from_hex(text.trim()) {
            let _ = (raw.hash(), raw.prev_hash(), bitcoin::target(raw.bits()));
        }
        let _ = crate::chain::algorand::decode_hash(text, "fuzz");
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
}

/// A config file as `outpost check-config` reads it: either kind, with its
/// error lines (which point at a line and column of the text).
pub fn config(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = crate::config::parse_any(std::path::Path::new("fuzz.toml"), text);
    }
}

/// A Prometheus scrape as the prometheus source reads it: the text
/// exposition format, then the configured series looked up in it.
pub fn prometheus_scrape(bytes: &[u8]) {
    use crate::chain::prometheus::{parse_scrape, Selector};
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(scrape) = parse_scrape(text) else {
        return;
    };
    for s in ["height", "h{chain=\"main\"}", "peers{a=\"1\",b=\"2\"}"] {
        if let Ok(sel) = Selector::parse(s) {
            let _ = sel.value(&scrape);
            let _ = sel.count(&scrape);
        }
    }
}

/// A snapshot file as `outpost snapshot verify` and start-up recovery read
/// it: header, manifest, sections and checksums.
pub fn snapshot(bytes: &[u8]) {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    let _ = crate::store::snapshot::verify(f.path());
}
